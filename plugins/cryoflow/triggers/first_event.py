"""Wait, from the triggerer, for whichever of several triggers fires first.

A processing run has several arrays in flight at once (a batch's CTFFIND and picking, the next
batch's MotionCor2, on clusters of their own) and wants new work the moment the ledger owes it.
Deferring on one of them leaves the others unseen until it ends: their results wait. This
trigger runs each of its triggers (a job array each, the ledger's owed work) side by side and
passes on the first event any of them yields; the others are cancelled (their connections
closed) and followed again by the next deferral.

``not_before_s`` holds an event that comes sooner than that after the trigger started. Airflow
3.3.2 fails a task that is resumed before the scheduler has seen the deferring workload end (that
workload's "success" for the same try reads as "killed externally" once the resumed one is queued
or running; the resumed try is then stopped by its heartbeat): a trigger must not fire within
the second or two the deferring process takes to exit.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

__all__ = ["FirstEventTrigger"]

#: only this bundle's own triggers are built from the stored class paths
_OWN = "cryoflow.triggers."


class FirstEventTrigger(BaseTrigger):
    """Run ``triggers`` (each ``BaseTrigger.serialize()`` output: class path and kwargs)
    together; fire the first event one of them yields. A trigger that ends without an event
    leaves the others running; when none is left, the event is ``{"status": "idle"}``. One
    that raises ends the wait with its error (the deferred task fails with it, as it would
    with that trigger alone).
    Killed by a user, it passes the kill on to each (a job trigger cancels its job).
    An event sooner than ``not_before_s`` after the start is held until then (see the module
    doc); an error is not.
    """

    def __init__(
        self, *, triggers: list[tuple[str, dict[str, Any]]], not_before_s: float = 0.0
    ) -> None:
        super().__init__()
        if not triggers:
            raise ValueError("FirstEventTrigger needs at least one trigger")
        self.triggers = [(str(path), dict(kwargs)) for path, kwargs in triggers]
        self.not_before_s = float(not_before_s)
        for path, _ in self.triggers:
            if not path.startswith(_OWN):
                raise ValueError(f"FirstEventTrigger runs cryoflow's triggers only, not {path}")

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "triggers": [[path, kwargs] for path, kwargs in self.triggers],
                "not_before_s": self.not_before_s,
            },
        )

    def _built(self) -> list[BaseTrigger]:
        built = []
        for path, kwargs in self.triggers:
            module, _, name = path.rpartition(".")
            built.append(getattr(importlib.import_module(module), name)(**kwargs))
        return built

    async def run(self) -> AsyncIterator[TriggerEvent]:
        loop = asyncio.get_running_loop()
        not_before = loop.time() + self.not_before_s
        # each pump puts its trigger's first event, or the error that ended it, then None
        events: asyncio.Queue[TriggerEvent | BaseException | None] = asyncio.Queue()

        async def pump(trigger: BaseTrigger) -> None:
            stream = trigger.run()
            try:
                async for event in stream:
                    await events.put(event)
                    return
            except Exception as exc:  # passed on: the deferred task fails with it
                events.put_nowait(exc)
            finally:
                await stream.aclose()  # its own clean-up (an SSH connection) runs now
                events.put_nowait(None)

        tasks = [asyncio.create_task(pump(t)) for t in self._built()]
        try:
            running = len(tasks)
            while running:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise item
                if item is not None:
                    await asyncio.sleep(max(0.0, not_before - loop.time()))
                    yield item
                    return
                running -= 1
            await asyncio.sleep(max(0.0, not_before - loop.time()))
            yield TriggerEvent({"status": "idle"})
        finally:
            await _stop(tasks)

    async def on_kill(self) -> None:
        for trigger in self._built():
            await trigger.on_kill()


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they have ended. Python 3.11's ``asyncio.wait_for`` (in
    an SSH command with a timeout) swallows a cancel that arrives as its command completes, and
    the poll loop goes on: a task still running after a second is cancelled again."""
    left = {task for task in tasks if not task.done()}
    try:
        while left:
            for task in left:
                task.cancel()
            _, left = await asyncio.wait(left, timeout=1.0)
    finally:
        for task in left:  # we were cancelled ourselves: leave none running
            task.cancel()
