"""ShareWatchTrigger: serializable with every argument, and one event per run."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cryoflow.ledger.store import Ledger
from cryoflow.triggers.share_watch import ShareWatchTrigger


def _make_trigger(tmp_path: Path, **overrides) -> ShareWatchTrigger:
    url = f"sqlite:///{tmp_path}/ledger.db"
    sid = Ledger(url).open_session("k1", "s", dest_root="/d", source_root="/s", params={})
    kwargs = dict(
        root=str(tmp_path / "share"),
        ledger_url=url,
        session_id=sid,
        settle_seconds=0.2,
        poll_seconds=0.05,
        batch_window_seconds=0,
        idle_timeout_seconds=0.5,
    )
    kwargs.update(overrides)
    return ShareWatchTrigger(**kwargs)


async def _events(trigger: ShareWatchTrigger) -> list[dict]:
    return [event.payload async for event in trigger.run()]


def test_serialize_round_trip(tmp_path: Path) -> None:
    trigger = _make_trigger(tmp_path, exclude=["*.jpg"], deadline="2026-11-25T08:00:00+00:00")
    path, kwargs = trigger.serialize()
    assert path == "cryoflow.triggers.share_watch.ShareWatchTrigger"
    clone = ShareWatchTrigger(**kwargs)
    assert clone.serialize() == (path, kwargs)
    assert kwargs["exclude"] == ["*.jpg"] and kwargs["deadline"].startswith("2026-11-25")


def test_yields_one_batch_event(tmp_path: Path) -> None:
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "m1.dat").write_bytes(b"12")
    (events,) = [asyncio.run(_events(_make_trigger(tmp_path)))]
    assert len(events) == 1
    assert events[0]["status"] == "ready"
    assert [f["relpath"] for f in events[0]["files"]] == ["m1.dat"]


def test_idle_share_ends_the_session(tmp_path: Path) -> None:
    (tmp_path / "share").mkdir()
    (event,) = asyncio.run(_events(_make_trigger(tmp_path)))
    assert event["status"] == "ended" and "idle" in event["reason"]


def test_unreachable_ledger_does_not_end_the_watch(tmp_path: Path) -> None:
    """The ledger database away for a few seconds: the watch reports, backs off and goes on."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "m1.dat").write_bytes(b"12")
    trigger = _make_trigger(tmp_path, backoff_max_seconds=0.2)
    db = tmp_path / "ledger.db"
    hidden = tmp_path / "ledger.db.away"
    url = trigger.ledger_url
    trigger.ledger_url = f"sqlite:///{tmp_path}/gone/ledger.db"  # unreachable: no such folder

    async def outage_then_back() -> list[dict]:
        async def restore() -> None:
            await asyncio.sleep(2.0)
            trigger.ledger_url = url

        task = asyncio.ensure_future(restore())
        events = await asyncio.wait_for(_events(trigger), 30)
        await task
        return events

    assert db.exists() and not hidden.exists()
    (event,) = asyncio.run(outage_then_back())
    assert event["status"] == "ready"
    assert [f["relpath"] for f in event["files"]] == ["m1.dat"]


def test_operator_end_request_ends_a_waiting_watch(tmp_path: Path) -> None:
    (tmp_path / "share").mkdir()
    trigger = _make_trigger(tmp_path, idle_timeout_seconds=3600)
    Ledger(trigger.ledger_url).request_end(trigger.session_id, "ended by an operator")
    (event,) = asyncio.run(asyncio.wait_for(_events(trigger), 30))
    assert event["status"] == "ended" and event["reason"] == "ended by an operator"


def test_hung_poll_is_reported_not_waited_on_silently(tmp_path: Path, capfd) -> None:
    """A poll that does not return (a hung CIFS mount) is reported after the poll timeout."""
    import threading

    (tmp_path / "share").mkdir()
    trigger = _make_trigger(tmp_path, poll_timeout_seconds=0.3)
    release = threading.Event()
    real_poll = trigger._poll
    calls = []

    def hanging_poll(watch):
        calls.append(1)
        release.wait(5)
        return real_poll(watch)

    trigger._poll = hanging_poll  # type: ignore[method-assign]

    calls_while_hung = []

    def unhang() -> None:
        calls_while_hung.append(len(calls))
        release.set()

    async def run() -> list[dict]:
        asyncio.get_running_loop().call_later(1.5, unhang)
        return await asyncio.wait_for(_events(trigger), 30)

    (event,) = asyncio.run(run())
    assert event["status"] == "ended"
    out = capfd.readouterr().out
    assert "has not returned after 0.3 s: is the share's mount hung?" in out
    assert "has not returned after 1.2 s" in out
    # the same call was waited for: no pile of threads on a dead mount
    assert calls_while_hung == [1]


def test_already_copied_files_are_not_offered(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    f = share / "done.dat"
    f.write_bytes(b"1")
    trigger = _make_trigger(tmp_path)
    ledger = Ledger(trigger.ledger_url)
    fid, *_ = ledger.begin_copy(
        trigger.session_id,
        "done.dat",
        kind="movie",
        size=1,
        mtime_ns=f.stat().st_mtime_ns,
        batch="b",
    )
    ledger.mark_verified(fid, checksum="x", dest_path="/d/done.dat", copy_seconds=0)
    (event,) = asyncio.run(_events(trigger))
    assert event["status"] == "ended"


def test_done_files_are_read_once_then_only_what_changed(tmp_path: Path) -> None:
    """Later batches of a session read only recently copied rows, not the whole session."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from cryoflow.ledger.store import FileRow, get_engine
    from cryoflow.triggers.share_watch import DoneFilesCache

    url = f"sqlite:///{tmp_path}/ledger.db"
    ledger = Ledger(url)
    sid = ledger.open_session("k1", "s", dest_root="/d", source_root="/s", params={})

    def verify(name: str) -> int:
        fid = ledger.begin_copy(sid, name, kind="movie", size=1, mtime_ns=1, batch="b").file_id
        ledger.mark_verified(fid, checksum="x", dest_path=f"/d/{name}", copy_seconds=0)
        return fid

    old = verify("old.tif")
    with get_engine(url).begin() as conn:  # copied two hours ago
        two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
        conn.execute(update(FileRow).where(FileRow.id == old).values(copy_started_at=two_hours_ago))
    cache = DoneFilesCache()
    assert cache.get(ledger, sid, 3) == {"old.tif": (1, 1)}
    # a row the cache has read long ago is not read again: change it behind the cache's back...
    with get_engine(url).begin() as conn:
        conn.execute(update(FileRow).where(FileRow.id == old).values(size=99))
    verify("new.tif")
    # ...the later read brings the new row (copied since) and not the old one
    later = cache.get(ledger, sid, 3)
    assert later == {"old.tif": (1, 1), "new.tif": (1, 1)}
    fresh = DoneFilesCache().get(ledger, sid, 3)
    assert fresh["old.tif"] == (99, 1)  # a new triggerer process reads everything
