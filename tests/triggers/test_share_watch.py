"""ShareWatchTrigger: serializable with every argument, and one event per run."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cryoflow.ledger import Ledger
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
    (tmp_path / "share" / "m1.tif").write_bytes(b"12")
    (events,) = [asyncio.run(_events(_make_trigger(tmp_path)))]
    assert len(events) == 1
    assert events[0]["status"] == "ready"
    assert [f["relpath"] for f in events[0]["files"]] == ["m1.tif"]


def test_idle_share_ends_the_session(tmp_path: Path) -> None:
    (tmp_path / "share").mkdir()
    (event,) = asyncio.run(_events(_make_trigger(tmp_path)))
    assert event["status"] == "ended" and "idle" in event["reason"]


def test_unreachable_ledger_is_an_error_event(tmp_path: Path) -> None:
    trigger = _make_trigger(tmp_path)
    trigger.ledger_url = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    (event,) = asyncio.run(_events(trigger))
    assert event["status"] == "error" and "ledger unreachable" in event["reason"]


def test_already_copied_files_are_not_offered(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    f = share / "done.tif"
    f.write_bytes(b"1")
    trigger = _make_trigger(tmp_path)
    ledger = Ledger(trigger.ledger_url)
    fid, _ = ledger.begin_copy(
        trigger.session_id,
        "done.tif",
        kind="movie",
        size=1,
        mtime_ns=f.stat().st_mtime_ns,
        batch="b",
    )
    ledger.mark_verified(fid, checksum="x", dest_path="/d/done.tif", copy_seconds=0)
    (event,) = asyncio.run(_events(trigger))
    assert event["status"] == "ended"
