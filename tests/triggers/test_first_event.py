"""What a deferred processing run waits on: its arrays and the ledger at once, first event wins."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from airflow.triggers.base import BaseTrigger, TriggerEvent

from cryoflow.ledger.store import Ledger
from cryoflow.processing.compute.jobscript import JobLayout, build_array_script
from cryoflow.processing.compute.local import LocalCompute
from cryoflow.processing.compute.settings import LocalBackend
from cryoflow.triggers.first_event import FirstEventTrigger
from cryoflow.triggers.owed_work import OwedWorkTrigger
from cryoflow.triggers.slurm_job import SlurmJobTrigger


def _events(trigger: FirstEventTrigger, timeout_s: float = 30) -> list[dict]:
    async def collect() -> list[dict]:
        return [e.payload async for e in trigger.run()]

    return asyncio.run(asyncio.wait_for(collect(), timeout_s))


def test_newly_owed_work_wakes_a_run_whose_array_still_runs(tmp_path: Path) -> None:
    backend = LocalBackend(workdir=str(tmp_path / "jobs"), max_parallel=1, poll_interval_s=0.2)
    client = LocalCompute(backend)
    layout = JobLayout(str(tmp_path / "jobs" / "long"))
    job = client.submit(build_array_script(step="t", tasks=[["sleep", "30"]], layout=layout),
                        layout, 1)  # fmt: skip
    url = f"sqlite:///{tmp_path}/ledger.db"
    ledger = Ledger(url)
    sid = ledger.open_session("krios1", "s1", dest_root="/g/s1", source_root="/m/s1", params={})
    follow = SlurmJobTrigger(backend=backend.model_dump(mode="json"), job_id=job.job_id,
                             job_dir=job.job_dir, n_tasks=1)  # fmt: skip
    owed = OwedWorkTrigger(ledger_url=url, microscope="krios1", max_attempts=3, timeout_s=60,
                           poll_s=0.2)  # fmt: skip
    first = FirstEventTrigger(triggers=[follow.serialize(), owed.serialize()])

    def verify_later() -> None:  # the next batch is verified while the array runs
        time.sleep(1.0)
        fid, *_ = ledger.begin_copy(sid, "m.tif", kind="movie", size=1, mtime_ns=1, batch="b")
        ledger.mark_verified(fid, checksum="c", dest_path="/g/m.tif", copy_seconds=0,
                             owe=("motioncor",))  # fmt: skip

    try:
        threading.Thread(target=verify_later).start()
        t0 = time.monotonic()
        assert _events(first) == [{"status": "owed", "stage": "motioncor"}]
        assert time.monotonic() - t0 < 5  # at the ledger's next look, not at the array's end
        assert not client.poll([job])[job.job_id][0].terminal  # the array is left running
    finally:
        client.cancel([job])


def test_serialize_round_trips_and_only_own_triggers_are_built() -> None:
    owed = OwedWorkTrigger(ledger_url="sqlite:////x.db", microscope="m", max_attempts=3,
                           timeout_s=5)  # fmt: skip
    first = FirstEventTrigger(triggers=[owed.serialize()])
    classpath, kwargs = first.serialize()
    module, _, name = classpath.rpartition(".")
    rebuilt = getattr(__import__(module, fromlist=[name]), name)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    with pytest.raises(ValueError, match="os.system"):
        FirstEventTrigger(triggers=[("os.system", {"command": "true"})])


class _Stubborn(BaseTrigger):
    """A poll loop that swallows the first cancel, as an SSH command's ``wait_for`` does on
    Python 3.11 when the cancel arrives as the command completes."""

    swallowed = 0
    running = False

    def __init__(self, fire_after_s: float | None = None) -> None:
        super().__init__()
        self.fire_after_s = fire_after_s

    def serialize(self) -> tuple[str, dict]:
        return (f"{__name__}._Stubborn", {"fire_after_s": self.fire_after_s})

    async def run(self):
        if self.fire_after_s is not None:
            await asyncio.sleep(self.fire_after_s)
            yield TriggerEvent({"status": "fired"})
            return
        type(self).running = True
        try:
            while True:
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    if type(self).swallowed:
                        raise
                    type(self).swallowed += 1
        finally:
            type(self).running = False


def test_a_trigger_that_swallows_a_cancel_is_still_stopped(monkeypatch) -> None:
    import cryoflow.triggers.first_event as first_event

    monkeypatch.setattr(first_event, "_OWN", __name__.rpartition(".")[0])
    first = FirstEventTrigger(
        triggers=[_Stubborn().serialize(), _Stubborn(fire_after_s=0.3).serialize()]
    )
    t0 = time.monotonic()
    assert _events(first) == [{"status": "fired"}]
    assert time.monotonic() - t0 < 5
    assert _Stubborn.swallowed == 1 and not _Stubborn.running  # stopped, not left polling


class _Broken(_Stubborn):
    def serialize(self) -> tuple[str, dict]:
        return (f"{__name__}._Broken", {})

    async def run(self):
        raise RuntimeError("ledger schema is newer than this release")
        yield  # pragma: no cover


def test_an_error_in_one_trigger_ends_the_wait_with_that_error(monkeypatch) -> None:
    import cryoflow.triggers.first_event as first_event

    monkeypatch.setattr(first_event, "_OWN", __name__.rpartition(".")[0])
    first = FirstEventTrigger(triggers=[_Stubborn(fire_after_s=30).serialize(),
                                        _Broken().serialize()])  # fmt: skip
    with pytest.raises(RuntimeError, match="schema is newer"):
        _events(first)


def test_an_event_right_after_the_deferral_is_held_an_error_is_not(monkeypatch) -> None:
    # Airflow 3.3.2 fails a task resumed before its deferring workload's exit was seen
    import cryoflow.triggers.first_event as first_event

    monkeypatch.setattr(first_event, "_OWN", __name__.rpartition(".")[0])
    first = FirstEventTrigger(triggers=[_Stubborn(fire_after_s=0.0).serialize()],
                              not_before_s=1.5)  # fmt: skip
    t0 = time.monotonic()
    assert _events(first) == [{"status": "fired"}]
    assert time.monotonic() - t0 >= 1.5
    late = FirstEventTrigger(triggers=[_Stubborn(fire_after_s=0.5).serialize()],
                             not_before_s=0.2)  # fmt: skip
    t0 = time.monotonic()
    assert _events(late) == [{"status": "fired"}]
    assert time.monotonic() - t0 < 1.2  # one that comes later is not delayed
    broken = FirstEventTrigger(triggers=[_Broken().serialize()], not_before_s=30)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="schema is newer"):
        _events(broken)
    assert time.monotonic() - t0 < 5
