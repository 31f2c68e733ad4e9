"""The trigger a processing run lingers on: it fires as soon as the ledger owes new work."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from cryoflow.ledger.store import Ledger
from cryoflow.triggers.owed_work import OwedWorkTrigger


def _events(trigger: OwedWorkTrigger) -> list[dict]:
    async def collect() -> list[dict]:
        return [e.payload async for e in trigger.run()]

    return asyncio.run(asyncio.wait_for(collect(), 30))


def _trigger(url: str, timeout_s: float) -> OwedWorkTrigger:
    return OwedWorkTrigger(
        ledger_url=url, microscope="krios1", max_attempts=3, timeout_s=timeout_s, poll_s=0.2
    )


def test_lingering_ends_idle_without_work_and_wakes_when_a_batch_is_verified(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    ledger = Ledger(url)
    sid = ledger.open_session("krios1", "s1", dest_root="/g/s1", source_root="/m/s1", params={})
    t0 = time.monotonic()
    assert _events(_trigger(url, 1.0)) == [{"status": "idle", "stage": "motioncor"}]
    assert 0.9 <= time.monotonic() - t0 < 5

    def verify_later() -> None:  # a batch copied while the run lingers
        time.sleep(1.0)
        fid, *_ = ledger.begin_copy(sid, "m.tif", kind="movie", size=1, mtime_ns=1, batch="b")
        ledger.mark_verified(fid, checksum="c", dest_path="/g/m.tif", copy_seconds=0,
                             owe=("motioncor",))  # fmt: skip

    threading.Thread(target=verify_later).start()
    t0 = time.monotonic()
    assert _events(_trigger(url, 20.0)) == [{"status": "owed", "stage": "motioncor"}]
    assert time.monotonic() - t0 < 5  # at its next poll, not at the end of the linger
    # work taken by a run is not owed any more: lingering again ends idle
    assert ledger.claim("krios1", "motioncor", "run#1", limit=5, max_attempts=3)
    assert _events(_trigger(url, 0.5))[0]["status"] == "idle"


def test_serialize_round_trips() -> None:
    trigger = _trigger("sqlite:////x.db", 60.0)
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    rebuilt = getattr(__import__(module, fromlist=[name]), name)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
