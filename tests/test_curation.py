"""Curation: per-movie verdicts, the two STAR files, the thresholds in the form, alerts by mail."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.header import decode_header, make_header
from pathlib import Path

import pytest
import starfile

from cryoflow.config import CurationAlert, CurationThresholds, NotifierConfig, load_site
from cryoflow.ledger.store import Ledger, StageState
from cryoflow.processing import curation
from cryoflow.processing.batch import write_micrographs_ctf_star
from cryoflow.session import SessionHandle, SessionParams, SessionParamsError, form_params
from cryoflow.view.queries import DEFAULT_THRESHOLDS, thresholds_for

TH = CurationThresholds()
GOOD = {
    "motioncor": {"total_drift_A": 12.0},
    "ctf": {"defocus1_A": 15000.0, "defocus2_A": 15400.0, "astigmatism_A": 400.0,
            "fit_resolution_A": 3.8},
    "picking": {"particles": 150},
}  # fmt: skip


# ----------------------------------------------------------------------------- verdict rules


def test_a_movie_within_every_limit_is_accepted() -> None:
    assert curation.verdict(GOOD, TH) == (True, None)


@pytest.mark.parametrize(
    ("stage", "change", "reason"),
    [
        ("motioncor", {"total_drift_A": 45.5}, "drift 45.5 Å > 30 Å"),
        ("ctf", {"defocus1_A": 3000.0, "defocus2_A": 3400.0}, "defocus 0.32 µm < 0.5 µm"),
        ("ctf", {"defocus1_A": 40000.0, "defocus2_A": 41000.0}, "defocus 4.05 µm > 3 µm"),
        ("ctf", {"astigmatism_A": -1500.0}, "astigmatism 1500 Å > 1000 Å"),
        ("ctf", {"fit_resolution_A": 8.2}, "CTF fit 8.2 Å > 6 Å"),
        ("ctf", {"fit_resolution_A": None}, "no CTF fit resolution"),  # CTFFIND's inf
        ("picking", {"particles": 3}, "3 particles < 20"),
    ],
)
def test_each_limit_rejects_with_its_reason(stage: str, change: dict, reason: str) -> None:
    results = {**GOOD, stage: {**GOOD[stage], **change}}
    assert curation.verdict(results, TH) == (False, reason)


def test_every_missed_limit_is_named_and_steps_switched_off_are_not_judged() -> None:
    bad = {"motioncor": {"total_drift_A": 50.0}, "ctf": {**GOOD["ctf"], "fit_resolution_A": 9.0}}
    accepted, reason = curation.verdict(bad, TH)
    assert not accepted and reason == "drift 50 Å > 30 Å; CTF fit 9 Å > 6 Å"
    # picking off: no particle count, nothing to judge there
    assert curation.verdict({k: GOOD[k] for k in ("motioncor", "ctf")}, TH) == (True, None)
    strict = CurationThresholds(max_total_drift_A=10)
    assert curation.verdict(GOOD, strict) == (False, "drift 12 Å > 10 Å")


def test_thresholds_config_accepts_both_spellings_and_refuses_an_empty_defocus_range() -> None:
    th = CurationThresholds.model_validate({"max_drift_A": 40, "max_ctf_resolution_A": 4.5})
    assert th.max_total_drift_A == 40 and th.max_fit_resolution_A == 4.5
    with pytest.raises(ValueError, match="min_defocus_um"):
        CurationThresholds(min_defocus_um=3, max_defocus_um=2)


def test_the_view_draws_the_one_definition_of_the_defaults() -> None:
    assert CurationThresholds().model_dump() == DEFAULT_THRESHOLDS
    assert thresholds_for({"thresholds": CurationThresholds(min_particles=50).model_dump()})[
        "min_particles"
    ] == 50  # fmt: skip


# ----------------------------------------------------------------------------- the form


def test_form_offers_the_thresholds_optional_with_the_yaml_defaults() -> None:
    scope = load_site().microscopes["krios1"]
    form = form_params(scope)
    for key, value in scope.curation.thresholds.model_dump().items():
        assert form[key]["type"] == ["null", "number"], form[key]  # never required
        assert form[key]["default"] == value
    # the defaults start a session; empty fields mean the microscope's values
    values = {k: spec["default"] for k, spec in form.items()} | {"session_name": "s1"}
    params = SessionParams.from_form(values)
    assert params.thresholds(scope.curation.thresholds) == scope.curation.thresholds
    emptied = SessionParams.from_form(values | {"max_total_drift_A": None, "min_particles": 80})
    th = emptied.thresholds(scope.curation.thresholds)
    assert th.max_total_drift_A == 30 and th.min_particles == 80
    with pytest.raises(SessionParamsError, match="defocus"):
        SessionParams.from_form(values | {"min_defocus_um": 4.0}).thresholds(
            scope.curation.thresholds
        )


# ----------------------------------------------------------------------------- ledger + STAR

PARAMS = SessionParams(
    session_name="s", pixel_size_A=1.0, kv=300, cs_mm=2.7, dose_per_frame=1, frames=8,
    idle_timeout_minutes=1, max_hours=1,
)  # fmt: skip


def _movie(ledger: Ledger, sid: int, root: Path, name: str, **ctf_change: float) -> int:
    fid = ledger.begin_copy(sid, name, kind="movie", size=1, mtime_ns=1, batch="b").file_id
    ledger.mark_verified(fid, checksum="c", dest_path=str(root / "raw" / name), copy_seconds=0)
    aligned = str(root / "processed" / "motioncor" / f"{name}.mrc")
    ledger.record_stage(fid, "motioncor", StageState.DONE, results={"aligned": aligned,
                        "total_drift_A": 10.0}, then_owe=["ctf", "picking"])  # fmt: skip
    diag = str(root / "processed" / "ctffind" / f"{name}_ctf.mrc")
    ctf = {**GOOD["ctf"], "astig_angle_deg": 10.0, "cc": 0.2, "diag": diag, **ctf_change}
    ledger.record_stage(fid, "ctf", StageState.DONE, results=ctf)
    return fid


def test_verdicts_wait_for_the_last_step_and_the_star_files_split(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    root = tmp_path / "session"
    (root / "processed").mkdir(parents=True)
    sid = ledger.open_session("k", "s", dest_root=str(root), source_root="/s", params={})
    handle = SessionHandle(sid, "/s", str(root), None)
    good = _movie(ledger, sid, root, "grid 1 $(x) m0.tif")
    blurry = _movie(ledger, sid, root, "m1.tif", fit_resolution_A=9.5)
    empty = _movie(ledger, sid, root, "m2.tif")
    ids = [good, blurry, empty]
    # CTF done, picking still owed: no verdict yet
    assert curation.decide(ledger, ids, lambda _: TH, max_attempts=3) == []
    # the "all" file has every movie with a CTF as soon as CTF is done
    all_star = write_micrographs_ctf_star(ledger, handle, PARAMS, 0o640, ids, accepted_only=False)
    assert all_star is not None and all_star.name == "micrographs_ctf_all.star"
    assert write_micrographs_ctf_star(ledger, handle, PARAMS, 0o640, ids) is None  # none yet
    for fid, n in ((good, 120), (blurry, 90), (empty, 2)):
        ledger.record_stage(fid, "picking", StageState.DONE, results={"particles": n})
    verdicts = curation.decide(ledger, ids, lambda _: TH, max_attempts=3)
    assert verdicts == [
        (good, True, None),
        (blurry, False, "CTF fit 9.5 Å > 6 Å"),
        (empty, False, "2 particles < 20"),
    ]
    rows = {f.id: f for f in ledger.files(sid)}
    assert rows[good].accepted is True and rows[good].reject_reason is None
    assert rows[blurry].accepted is False and rows[blurry].reject_reason == "CTF fit 9.5 Å > 6 Å"
    assert rows[empty].decided_at is not None
    accepted = [fid for fid, ok, _ in verdicts if ok]
    star = write_micrographs_ctf_star(ledger, handle, PARAMS, 0o640, accepted)
    assert star is not None and star.name == "micrographs_ctf.star"
    assert star.stat().st_mode & 0o777 == 0o640 and all_star.stat().st_mode & 0o777 == 0o640
    names = list(starfile.read(star)["micrographs"]["rlnMicrographName"])
    assert names == ["processed/motioncor/grid 1 $(x) m0.tif.mrc"]
    assert len(starfile.read(all_star)["micrographs"]) == 3
    # a later run appends its accepted movie only (no rebuild from the session)
    late = _movie(ledger, sid, root, "m3.tif")
    ledger.record_stage(late, "picking", StageState.DONE, results={"particles": 60})
    ((_, ok, _),) = curation.decide(ledger, [late], lambda _: TH, max_attempts=3)
    assert ok
    write_micrographs_ctf_star(ledger, handle, PARAMS, 0o640, [late])
    write_micrographs_ctf_star(ledger, handle, PARAMS, 0o640, [late], accepted_only=False)
    write_micrographs_ctf_star(ledger, handle, PARAMS, 0o640, [late])  # again: no duplicate
    tables = starfile.read(star)
    assert len(tables["micrographs"]) == 2 and float(tables["optics"]["rlnVoltage"].iloc[0]) == 300
    assert len(starfile.read(all_star)["micrographs"]) == 4
    # a whole rewrite from the ledger gives the same accepted table
    star.unlink()
    write_micrographs_ctf_star(ledger, handle, PARAMS, 0o640)
    assert len(starfile.read(star)["micrographs"]) == 2


def test_a_step_out_of_tries_rejects_one_with_tries_left_waits(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    root = tmp_path / "session"
    sid = ledger.open_session("k", "s", dest_root=str(root), source_root="/s", params={})
    fid = _movie(ledger, sid, root, "m.tif")
    ledger.record_stage(fid, "picking", StageState.SUBMITTED)
    ledger.record_stage(fid, "picking", StageState.FAILED, error="boom")
    assert curation.decide(ledger, [fid], lambda _: TH, max_attempts=2) == []  # 1 of 2 tries
    ledger.record_stage(fid, "picking", StageState.SUBMITTED)
    ledger.record_stage(fid, "picking", StageState.FAILED, error="boom")
    assert curation.decide(ledger, [fid], lambda _: TH, max_attempts=2) == [
        (fid, False, "picking failed")
    ]


# ----------------------------------------------------------------------------- alerts


class _SmtpSink(socketserver.ThreadingTCPServer):
    """A minimal SMTP server on 127.0.0.1 keeping each message's raw bytes."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        super().__init__(("127.0.0.1", 0), _SmtpHandler)


class _SmtpHandler(socketserver.StreamRequestHandler):
    def _say(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        self._say("220 sink ESMTP")
        while line := self.rfile.readline():
            verb = line.strip().split(b" ", 1)[0].upper()
            if verb in (b"EHLO", b"HELO"):
                self._say("250 sink")
            elif verb == b"DATA":
                self._say("354 end with .")
                data = b""
                while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                    data += chunk[1:] if chunk.startswith(b"..") else chunk
                self.server.messages.append(data)  # type: ignore[attr-defined]
                self._say("250 queued")
            elif verb == b"QUIT":
                self._say("221 bye")
                return
            else:  # MAIL, RCPT, RSET, NOOP
                self._say("250 ok")


@pytest.fixture
def smtp_sink(monkeypatch: pytest.MonkeyPatch) -> Iterator[_SmtpSink]:
    sink = _SmtpSink()
    thread = threading.Thread(target=sink.serve_forever, daemon=True)
    thread.start()
    conn = {
        "conn_type": "smtp",
        "host": "127.0.0.1",
        "port": sink.server_address[1],
        "extra": {"disable_ssl": True, "disable_tls": True, "timeout": 5, "retry_limit": 0},
    }
    monkeypatch.setenv("AIRFLOW_CONN_CRYOFLOW_TEST_SMTP", json.dumps(conn))
    try:
        yield sink
    finally:
        sink.shutdown()
        sink.server_close()


def _decided(ledger: Ledger, sid: int, accepted: list[bool]) -> None:
    for i, ok in enumerate(accepted):
        fid = ledger.begin_copy(sid, f"a{i}.tif", kind="movie", size=1, mtime_ns=1, batch="b")
        ledger.set_verdicts([(fid.file_id, ok, None if ok else "drift")])


def test_low_acceptance_and_no_new_movie_alerts_mail_once_per_episode(
    tmp_path: Path, smtp_sink: _SmtpSink
) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    sid = ledger.open_session("krios1", "apof-0412", dest_root=str(tmp_path), source_root="/s",
                              params={})  # fmt: skip
    notifier = NotifierConfig(
        conn_id="cryoflow_test_smtp",
        to=["staff@facility.example"],
        from_email="cryoflow@facility.example",
    )
    cfg = CurationAlert(
        window=25, min_accepted_fraction=0.5, no_movie_minutes=15, notifier=notifier
    )
    send = curation.notifier_sender(cfg.notifier, {})
    _decided(ledger, sid, [True] * 10 + [False] * 15)  # 10 of the last 25
    now = datetime.now(UTC)
    alerts = curation.update_alerts(ledger, ledger.get_session(sid), cfg, send, now=now)
    low = alerts["low_acceptance"]
    assert low["active"] and low["notified"] and (low["accepted"], low["window"]) == (10, 25)
    assert not alerts["no_new_movie"]["active"]  # movies came just now
    assert len(smtp_sink.messages) == 1
    mail = message_from_bytes(smtp_sink.messages[0])
    subject = str(make_header(decode_header(mail["Subject"])))
    assert "apof-0412" in subject and mail["To"] == "staff@facility.example"
    body = "".join(
        part.get_payload(decode=True).decode() for part in mail.walk() if not part.is_multipart()
    )
    assert "apof-0412" in body and "10 of the last 25 movies accepted" in body and "40%" in body
    # the same episode: recorded, not mailed again
    curation.update_alerts(ledger, ledger.get_session(sid), cfg, send, now=now)
    assert len(smtp_sink.messages) == 1
    assert ledger.get_session(sid).curation_alerts["low_acceptance"]["active"] is True
    # 40 minutes later and still no new movie: the second kind of alert, one more mail
    later = now + timedelta(minutes=40)
    alerts = curation.update_alerts(ledger, ledger.get_session(sid), cfg, send, now=later)
    assert alerts["no_new_movie"]["active"] and alerts["no_new_movie"]["minutes"] >= 40
    assert len(smtp_sink.messages) == 2
    second = message_from_bytes(smtp_sink.messages[1])
    assert "no new movie" in str(make_header(decode_header(second["Subject"])))
    # acceptance recovers: the episode ends; a new drop is a new episode, mailed again
    _decided(ledger, sid, [True] * 25)
    alerts = curation.update_alerts(ledger, ledger.get_session(sid), cfg, send, now=later)
    assert not alerts["low_acceptance"]["active"] and "cleared_at" in alerts["low_acceptance"]
    _decided(ledger, sid, [False] * 25)
    curation.update_alerts(ledger, ledger.get_session(sid), cfg, send, now=later)
    assert len(smtp_sink.messages) == 3


def test_an_alert_that_cannot_be_sent_is_kept_and_sent_later(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    sid = ledger.open_session("k", "s", dest_root=str(tmp_path), source_root="/s", params={})
    cfg = CurationAlert(window=4)
    _decided(ledger, sid, [False] * 4)
    sent: list[str] = []

    def broken(subject: str, body: str) -> None:
        raise OSError("mail server away")

    alerts = curation.update_alerts(ledger, ledger.get_session(sid), cfg, broken)
    assert alerts["low_acceptance"]["active"] and not alerts["low_acceptance"]["notified"]
    assert "mail server away" in alerts["low_acceptance"]["notify_error"]
    curation.update_alerts(ledger, ledger.get_session(sid), cfg, lambda s, b: sent.append(b))
    assert sent == ["Session s (k): 0 of the last 4 movies accepted (0%; alert below 50%)."]
