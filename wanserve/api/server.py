"""Rank 0's server: the job store, the engine thread and Sanic, started and stopped together."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from wanserve.api.app import create_app
from wanserve.api.jobs import JobStore
from wanserve.api.metrics import Metrics
from wanserve.api.resume import resume_interrupted, settle_interrupted
from wanserve.api.serving import VideoService
from wanserve.engine.config import ServerConfig
from wanserve.engine.parallel.distributed import DistContext, exit_without_teardown
from wanserve.engine.serving.engine import Engine

log = logging.getLogger("wanserve.api")


def serve(cfg: ServerConfig, ctx: DistContext, load_model: Callable) -> int:
    """Blocks until the server stops; returns the process exit code (non-zero when the
    engine broke, so torchrun or the operator can restart it)."""
    store = JobStore(cfg.data_dir, ttl_s=cfg.video_ttl_s)
    service = VideoService(cfg, store, Metrics(lambda: engine.queue_depth))
    engine = Engine(ctx, load_model, service, cfg.max_queue, cfg.job_timeout_s)
    service.engine = engine
    service.metrics.watch_prompt_cache(lambda: engine.prompt_cache_counts)
    app = create_app(cfg, service)

    @app.before_server_start
    async def start_engine(app):
        loop = asyncio.get_running_loop()
        service.loop = service.events.loop = loop
        service.on_fatal_hook = lambda message: loop.call_soon_threadsafe(stop_once)
        resumed = settle_interrupted(service)
        engine.start()
        app.add_task(resume_interrupted(service, resumed), name="resume-jobs")
        app.add_task(sweep_store(), name="sweep-store")

    async def sweep_store():
        """Expired jobs, the store's caps and leftovers (wanserve/api/retention.py)."""
        retention = service.retention
        while True:
            try:
                report = await asyncio.get_running_loop().run_in_executor(None, retention.sweep)
                if report.expired:
                    log.info("expired %d videos", report.expired)
            except Exception:  # a full disk, a file in use: the next sweep tries again
                log.exception("sweeping the store failed")
            await asyncio.sleep(retention.sweep_interval_s)

    stopping = False

    def stop_once():
        if not stopping:
            app.stop()

    stopped_cleanly = True

    @app.before_server_stop
    async def stop_engine(app):
        """Before the HTTP server drains, so that every synchronous caller still gets an
        answer: its job's, or that the job is kept for the restart."""
        nonlocal stopping, stopped_cleanly
        stopping = True
        service.begin_stop()
        for task in ("resume-jobs", "sweep-store"):
            await app.cancel_task(task, raise_exception=False)
        stopped_cleanly = await asyncio.get_running_loop().run_in_executor(
            None, engine.stop, cfg.stop_timeout_s)
        service.release_waiters()

    @app.after_server_stop
    async def close_store(app):
        service.close()
        store.close()

    log.info("serving %s on http://%s:%d (layout %s, %d rank(s))", cfg.served_model_name,
             cfg.host, cfg.port, cfg.layout.describe(), ctx.world_size)
    app.run(host=cfg.host, port=cfg.port, single_process=True, access_log=False, motd=False)
    if not stopped_cleanly:
        # the engine thread is still inside a step (a collective, a long kernel): tearing the
        # process groups down under it could hang; every job is already marked
        log.error("exiting without waiting for the engine thread")
        exit_without_teardown(1)
    if engine.state == "failed":
        log.error("exiting with an error: %s", engine.error)
        return 1
    return 0
