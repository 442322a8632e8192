"""Per-job progress subscriptions for GET /v1/videos/{id}/events.

Publishing happens on any thread (the engine thread reports steps, the encoder completes
jobs); every subscriber's queue lives on the event loop, so events are handed over with
`call_soon_threadsafe` and arrive in the order they were published.
"""
from __future__ import annotations

import asyncio
from collections import defaultdict

TERMINAL_EVENT = ("completed", "failed", "cancelled")


class EventHub:
    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: dict[str, set[asyncio.Queue]] = defaultdict(set)  # loop only

    def subscribe(self, job_id: str) -> asyncio.Queue:
        """On the event loop."""
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers[job_id].add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        """On the event loop."""
        queues = self._subscribers.get(job_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._subscribers[job_id]

    def publish(self, job_id: str, event: dict) -> None:
        """From any thread; a no-op without a running loop (start-up, shutdown)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._deliver, job_id, event)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _deliver(self, job_id: str, event: dict) -> None:
        for queue in list(self._subscribers.get(job_id, ())):
            queue.put_nowait(event)


async def follow(hub: EventHub, job_id: str, snapshot, keepalive_s: float = 15.0):
    """Yields the job's current event (`snapshot()`), then each published one, until a
    terminal one; None every `keepalive_s` without news (for a keep-alive comment).
    Subscribing before taking the snapshot means no terminal event can fall in between."""
    queue = hub.subscribe(job_id)
    try:
        event = snapshot()
        yield event
        step = event.get("step") or 0
        while event["status"] not in TERMINAL_EVENT:
            try:
                event = await asyncio.wait_for(queue.get(), keepalive_s)
            except asyncio.TimeoutError:
                yield None
                continue
            # a step published before the snapshot was taken may still be on its way
            if event["status"] in TERMINAL_EVENT or (event.get("step") or 0) > step:
                step = event.get("step") or step
                yield event
    finally:
        hub.unsubscribe(job_id, queue)
