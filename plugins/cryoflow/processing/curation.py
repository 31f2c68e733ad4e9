"""Curation: each movie accepted or rejected (with the reason), and the session's alerts.

A movie's verdict is decided once its last processing step is settled (done, or failed with no
tries left), from the stage results the ledger holds (``processing._parse``'s keys): MotionCor2
``total_drift_A``, CTFFIND ``defocus1_A``/``defocus2_A``/``astigmatism_A``/``fit_resolution_A``
and the picker's ``particles``. A step that was switched off is not judged.

Alerts look at one session: fewer than ``min_accepted_fraction`` of its last ``window`` decided
movies accepted (judged once the window is full), or a running session without a new movie for
``no_movie_minutes``. Each is kept in ``cryoflow_sessions.curation_alerts`` (the session view
shows it) and sent once per episode (from the moment it starts until it clears) through an
Airflow notifier (SMTP, or Slack where that provider is installed). No Airflow at import time.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from cryoflow.config import CurationAlert, CurationThresholds, NotifierConfig
from cryoflow.ledger.store import Ledger, SessionRow, StageRow, StageState
from cryoflow.processing.steps import MOVIE_KIND, STAGES

log = logging.getLogger(__name__)

LOW_ACCEPTANCE = "low_acceptance"
NO_NEW_MOVIE = "no_new_movie"


def verdict(results: dict[str, dict[str, Any]], th: CurationThresholds) -> tuple[bool, str | None]:
    """(accepted, reason) of one movie from its done stages' results ({stage: results}); every
    limit it misses is named in the reason."""
    reasons: list[str] = []
    mc = results.get("motioncor")
    if mc is not None:
        drift = mc.get("total_drift_A")
        if drift is None:
            reasons.append("no drift measured")
        elif drift > th.max_total_drift_A:
            reasons.append(f"drift {drift:g} Å > {th.max_total_drift_A:g} Å")
    ctf = results.get("ctf")
    if ctf is not None:
        d1, d2 = ctf.get("defocus1_A"), ctf.get("defocus2_A")
        if d1 is None or d2 is None:
            reasons.append("no defocus measured")
        else:
            um = (d1 + d2) / 2 / 1e4
            if um < th.min_defocus_um:
                reasons.append(f"defocus {um:.2f} µm < {th.min_defocus_um:g} µm")
            elif um > th.max_defocus_um:
                reasons.append(f"defocus {um:.2f} µm > {th.max_defocus_um:g} µm")
        astig = ctf.get("astigmatism_A")
        if astig is not None and abs(astig) > th.max_astigmatism_A:
            reasons.append(f"astigmatism {abs(astig):g} Å > {th.max_astigmatism_A:g} Å")
        fit = ctf.get("fit_resolution_A")  # None: CTFFIND said inf (no fit)
        if fit is None:
            reasons.append("no CTF fit resolution")
        elif fit > th.max_fit_resolution_A:
            reasons.append(f"CTF fit {fit:g} Å > {th.max_fit_resolution_A:g} Å")
    picks = results.get("picking")
    if picks is not None:
        n = picks.get("particles")
        if n is None or n < th.min_particles:
            reasons.append(f"{n if n is not None else 'no'} particles < {th.min_particles:g}")
    return (not reasons, "; ".join(reasons) or None)


def decide(
    ledger: Ledger,
    file_ids: Iterable[int],
    thresholds: Callable[[int], CurationThresholds],
    max_attempts: int,
) -> list[tuple[int, bool, str | None]]:
    """Decide and record the verdicts of those ``file_ids`` whose steps are all settled;
    ``thresholds(file_id)`` gives the movie's session's thresholds. Returns the verdicts."""
    by_file: dict[int, list[StageRow]] = {}
    for st in ledger.stages(set(file_ids)):
        if st.stage in STAGES:
            by_file.setdefault(st.file_id, []).append(st)
    verdicts: list[tuple[int, bool, str | None]] = []
    for file_id, rows in sorted(by_file.items()):
        if any(_owed(st, max_attempts) for st in rows):
            continue  # a step still to run (or to retry): not yet
        failed = [st.stage for st in rows if st.state == StageState.FAILED]
        if failed:
            verdicts.append((file_id, False, f"{', '.join(failed)} failed"))
            continue
        done = {st.stage: st.results or {} for st in rows if st.state == StageState.DONE}
        verdicts.append((file_id, *verdict(done, thresholds(file_id))))
    if verdicts:
        ledger.set_verdicts(verdicts)
    return verdicts


def _owed(st: StageRow, max_attempts: int) -> bool:
    if st.state in (StageState.PENDING, StageState.SUBMITTED):
        return True
    return st.state == StageState.FAILED and (st.attempts or 0) < max_attempts


# ----------------------------------------------------------------------------- alerts


def evaluate(
    ledger: Ledger, session: SessionRow, cfg: CurationAlert, now: datetime | None = None
) -> dict[str, dict[str, Any]]:
    """The session's alert conditions now: {kind: {active, message, figures...}}."""
    now = now or datetime.now(UTC)
    found: dict[str, dict[str, Any]] = {}
    verdicts = ledger.recent_verdicts(session.id, cfg.window)
    accepted = sum(1 for v in verdicts if v)
    low = len(verdicts) >= cfg.window and accepted < cfg.min_accepted_fraction * cfg.window
    found[LOW_ACCEPTANCE] = {
        "active": low,
        "accepted": accepted,
        "decided": len(verdicts),
        "window": cfg.window,
        "min_accepted_fraction": cfg.min_accepted_fraction,
        "message": (
            f"{accepted} of the last {len(verdicts)} movies accepted "
            f"({accepted / len(verdicts):.0%}; alert below {cfg.min_accepted_fraction:.0%})"
            if verdicts
            else "no movie decided yet"
        ),
    }
    if session.state != "closed":
        opened = session.opened_at.replace(tzinfo=session.opened_at.tzinfo or UTC)
        last = ledger.last_movie_at(session.id, MOVIE_KIND)
        since = last or opened
        minutes = (now - since).total_seconds() / 60
        found[NO_NEW_MOVIE] = {
            "active": minutes > cfg.no_movie_minutes,
            "minutes": round(minutes, 1),
            "limit_minutes": cfg.no_movie_minutes,
            "last_movie_at": last.isoformat() if last else None,
            "message": (
                f"no new movie for {minutes:.0f} min (alert after {cfg.no_movie_minutes:g} min)"
                if last
                else f"no movie since the session opened {minutes:.0f} min ago "
                f"(alert after {cfg.no_movie_minutes:g} min)"
            ),
        }
    return found


def update_alerts(
    ledger: Ledger,
    session: SessionRow,
    cfg: CurationAlert,
    send: Callable[[str, str], None] | None,
    now: datetime | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate, record and (once per episode) send the session's alerts; ``send(subject,
    body)`` is the notifier (None: recorded only). A send that fails is logged and tried again
    at the next evaluation of the same episode. Returns the recorded alerts."""
    now = now or datetime.now(UTC)
    before = session.curation_alerts or {}
    after: dict[str, dict[str, Any]] = {}
    for kind, state in evaluate(ledger, session, cfg, now).items():
        old = before.get(kind) or {}
        if state["active"]:
            episode = old.get("active") is True
            state["since"] = old.get("since") if episode else now.isoformat()
            state["notified"] = bool(episode and old.get("notified"))
            if not state["notified"] and send is not None:
                subject = f"cryoflow: session {session.name} on {session.microscope}: " + (
                    "few movies accepted" if kind == LOW_ACCEPTANCE else "no new movie"
                )
                body = f"Session {session.name} ({session.microscope}): {state['message']}."
                try:
                    send(subject, body)
                    state["notified"] = True
                    state["notified_at"] = now.isoformat()
                except Exception as exc:  # noqa: BLE001 - the alert stays, sent next time
                    state["notify_error"] = f"{type(exc).__name__}: {exc}"[:500]
                    log.warning("Alert for session %s not sent: %s", session.name, exc)
        elif old.get("active"):
            state["cleared_at"] = now.isoformat()
        after[kind] = state
    # a closed session keeps its last no-new-movie state, inactive
    if NO_NEW_MOVIE not in after and NO_NEW_MOVIE in before:
        after[NO_NEW_MOVIE] = {**before[NO_NEW_MOVIE], "active": False}
    if after != before:
        ledger.save_alerts(session.id, after)
    return after


def notifier_sender(cfg: NotifierConfig, context: dict[str, Any]) -> Callable[[str, str], None]:
    """``send(subject, body)`` through the configured Airflow notifier (imported when used)."""

    def send(subject: str, body: str) -> None:
        if cfg.kind == "smtp":
            from airflow.providers.smtp.notifications.smtp import SmtpNotifier

            SmtpNotifier(
                to=cfg.to,
                from_email=cfg.from_email,
                smtp_conn_id=cfg.conn_id,
                subject=subject,
                html_content=f"<p>{html.escape(body)}</p>",
            ).notify(context)
        else:
            try:
                from airflow.providers.slack.notifications.slack_webhook import (
                    SlackWebhookNotifier,
                )
            except ImportError as exc:
                raise RuntimeError(
                    "curation.alert.notifier.kind slack needs apache-airflow-providers-slack"
                ) from exc
            SlackWebhookNotifier(
                slack_webhook_conn_id=cfg.conn_id, text=f"{subject}\n{body}"
            ).notify(context)

    return send


__all__ = ["decide", "evaluate", "notifier_sender", "update_alerts", "verdict"]
