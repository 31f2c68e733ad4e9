"""Wait, from the triggerer, until the ledger owes a microscope new processing work.

A processing run with nothing left to follow lingers here instead of ending, so the next batch
of the session is taken by the same run (one task instance for many batches) as soon as it is
verified. The check is one indexed lookup in a thread every ``poll_s``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

__all__ = ["OwedWorkTrigger"]


class OwedWorkTrigger(BaseTrigger):
    """Fire ``{"status": "owed"}`` once ``stage`` work is owed for ``microscope``, or
    ``{"status": "idle"}`` after ``timeout_s`` without any. A ledger that cannot be read is
    asked again at the next poll (its error logged); the timeout still ends the wait."""

    def __init__(
        self,
        *,
        ledger_url: str,
        microscope: str,
        max_attempts: int,
        timeout_s: float,
        stage: str = "motioncor",
        poll_s: float = 2.0,
    ) -> None:
        super().__init__()
        self.ledger_url = ledger_url
        self.microscope = microscope
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.stage = stage
        self.poll_s = poll_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "ledger_url": self.ledger_url,
                "microscope": self.microscope,
                "max_attempts": self.max_attempts,
                "timeout_s": self.timeout_s,
                "stage": self.stage,
                "poll_s": self.poll_s,
            },
        )

    def _owed(self) -> bool:
        from cryoflow.ledger.store import Ledger

        return Ledger(self.ledger_url).has_owed(self.microscope, self.stage, self.max_attempts)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.timeout_s
        while True:
            try:
                if await asyncio.to_thread(self._owed):
                    yield TriggerEvent({"status": "owed", "stage": self.stage})
                    return
            except Exception as exc:  # noqa: BLE001 - a ledger outage: ask again
                self.log.warning("Ledger not readable, asking again: %r", exc)
            if loop.time() >= end:
                yield TriggerEvent({"status": "idle", "stage": self.stage})
                return
            await asyncio.sleep(min(self.poll_s, max(0.0, end - loop.time())))
