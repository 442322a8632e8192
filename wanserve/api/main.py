"""Entry point of every rank (started by torchrun through launch.sh): the rank split.

Rank 0 serves HTTP and drives the engine; the leader of every other replica takes jobs from
rank 0 (wanserve/engine/serving/replicas.py); every other rank assembles the same model and runs the worker
loop of its replica. It sits here, above both `api` and `engine`, so that imports run one way only:
api → engine → kernels.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

from wanserve.engine.config import load_config
from wanserve.engine.parallel.distributed import (die_with_launcher, env_world, exit_without_teardown,
                                init_distributed, ready_barrier, shutdown)
from wanserve.engine.parallel.layout import LayoutError
from wanserve.engine.startup import (check_devices, check_layout, check_sizes, resolve_model_path,
                            setup_logging)

log = logging.getLogger("wanserve")

# A rank other than 0 that was told to stop exits by itself if rank 0's Shutdown has not come
# this long after rank 0's own wait for its running job (--stop-timeout).
STOP_MARGIN_S = 15.0


def _stop_when_rank_0_says_so(rank: int, stop_timeout_s: float) -> None:
    grace = stop_timeout_s + STOP_MARGIN_S

    def exit_now():
        log.error("rank %d: no word from rank 0 %gs after the stop signal; exiting", rank, grace)
        exit_without_teardown(1)

    def on_signal(*_):
        log.info("rank %d: waiting for rank 0 to stop (at most %gs)", rank, grace)
        timer = threading.Timer(grace, exit_now)
        timer.daemon = True
        timer.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()
    cfg = load_config(argv)
    rank, world_size, _ = env_world()
    setup_logging(cfg.log_level, rank)
    model_path = resolve_model_path(cfg)
    check_sizes(cfg, model_path)
    try:
        check_layout(cfg, world_size, model_path)
        check_devices(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    except LayoutError as exc:
        if rank == 0:
            log.error("invalid parallel layout: %s", exc)
        return 2
    # only now the seconds of importing diffusers and xfuser: a bad flag is refused at once
    from wanserve.engine.assembly import assemble

    ctx = init_distributed(cfg.layout, cfg.collective_timeout_s)
    try:
        if ctx.is_driver:
            from wanserve.api.server import serve

            return serve(cfg, ctx, lambda: assemble(cfg, ctx, model_path))
        from wanserve.engine.serving.replicas import leader_loop
        from wanserve.engine.serving.worker import worker_loop

        # Stopping is rank 0's call: it finishes or fails the running jobs and sends Shutdown
        # (through each replica's leader), which ends these loops.
        _stop_when_rank_0_says_so(rank, cfg.stop_timeout_s)
        model = assemble(cfg, ctx, model_path)
        ready_barrier(ctx)
        (leader_loop if ctx.is_leader else worker_loop)(ctx, model)
        # told to stop by rank 0: this node's own stop signal may still be on its way, and
        # arriving while Python tears the process down (its handlers gone) it would kill it
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        return 0
    finally:
        shutdown()


if __name__ == "__main__":
    exit_without_teardown(main())
