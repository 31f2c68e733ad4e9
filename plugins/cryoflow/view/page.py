"""The session view's HTML: server-rendered, inline SVG plots, no framework and nothing loaded
from outside the API server (the facility network may be closed). The only script is the view's
own ``view.js`` (the "end session" button); everything else works without it.

Pages are shown inside the Airflow UI (an external view, in an iframe): links into Airflow open
in the top window, links within the view stay in the frame. Every value is escaped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import quote

from cryoflow.view import plots

CSS = """
body{font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px;color:#1d1d1d}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:14px 0 6px}a{color:#1f5fa8}table{border-collapse:collapse}
.scroll{overflow-x:auto;max-width:100%}
td.reason{max-width:280px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{background:#f5f5f5;font-weight:600}td.l,th.l{text-align:left}.muted{color:#777}
.bad{color:#b3261e;font-weight:600}.ok{color:#1b7f3b}.warn{color:#a15c00}
.state{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;background:#eee}
.state.open{background:#d7f0dc;color:#145c2a}.state.closed{background:#eee;color:#555}
.tiles{display:flex;flex-wrap:wrap;gap:10px}.tile{border:1px solid #ddd;padding:6px}
.tile img{width:170px;height:170px;object-fit:contain;background:#111;display:block}
.tile .imgs{display:flex;gap:4px}.tile .cap{font-size:12px;margin-top:4px;max-width:520px}
.plots{display:flex;flex-wrap:wrap;gap:8px 18px}.pair{display:flex;gap:6px}
.big{font-size:22px;font-weight:600}.cards{display:flex;flex-wrap:wrap;gap:8px}
.card{border:1px solid #ddd;border-radius:6px;padding:6px 12px;min-width:92px}
.card .lab{font-size:11px;color:#666;text-transform:uppercase;letter-spacing:.03em}
button.end{background:#b3261e;color:#fff;border:0;border-radius:4px;padding:6px 14px;
cursor:pointer}button.end[disabled]{background:#aaa}#end-result{margin-left:10px}
form.start .field{margin:8px 0}form.start label{display:block;font-weight:600}
form.start input[type=text],form.start input[type=number]{width:22em;padding:3px 5px}
form.start input[aria-invalid=true]{border:2px solid #b3261e}
form.start .err{color:#b3261e;font-weight:600;margin-left:8px}form.start .hint{font-size:12px}
button.start{background:#1b5e9f;color:#fff;border:0;border-radius:4px;padding:6px 14px;
cursor:pointer}button.start[disabled]{background:#aaa}#start-result{margin-left:10px}
"""


#: The view's one script (served by the app as ``view.js``; kept here, not as a package data
#: file, so that an installed wheel carries it too).
SCRIPT = """// The session view's one script: the "end session" button. It asks for the session's
// name (a guard against a click on the wrong page), then POSTs JSON to the view's end endpoint with
// the browser's Airflow session cookie; the endpoint triggers Airflow's end_session DAG.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const button = document.querySelector("button.end");
  if (!button) return;
  const out = document.getElementById("end-result");
  button.addEventListener("click", async () => {
    const name = button.dataset.session;
    const typed = window.prompt(`End session ${name} now? Type its name to confirm.`);
    if (typed === null) return;
    button.disabled = true;
    out.textContent = "asking Airflow…";
    try {
      const response = await fetch(button.dataset.endUrl, {
        method: "POST",
        credentials: "same-origin",
        headers: {"Content-Type": "application/json", "Accept": "application/json"},
        body: JSON.stringify({confirm: typed}),
      });
      const body = await response.json().catch(() => ({}));
      if (!response.ok) {
        const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
        out.textContent = `refused (${response.status}): ${detail || response.statusText}`;
        button.disabled = false;
        return;
      }
      out.textContent = "";
      const link = document.createElement("a");
      link.href = body.url;
      link.target = "_top";
      link.textContent = `end_session run ${body.dag_run_id}`;
      out.append("triggered: ", link, " — the session closes when its batch has finished.");
    } catch (err) {
      out.textContent = `failed: ${err}`;
      button.disabled = false;
    }
  });
});
"""

SCRIPT += """
// The start form: each field is checked as it is left, with the bounds and patterns the server
// checks again; the server's answer (422: field -> problem) is shown beside the fields too.
document.addEventListener("DOMContentLoaded", () => {
  const form = document.querySelector("form.start");
  if (!form) return;
  const out = document.getElementById("start-result");
  const inputs = [...form.querySelectorAll("input")];
  const show = (name, message) => {
    const span = document.getElementById(`err-${name}`);
    const input = document.getElementById(`f-${name}`);
    if (span) span.textContent = message || "";
    if (input) input.setAttribute("aria-invalid", message ? "true" : "false");
  };
  const problem = (input) => {
    if (input.type === "checkbox") return "";
    const v = input.value.trim();
    if (v === "") return input.required ? "required" : "";
    if (input.type === "number") {
      const n = Number(v);
      if (!Number.isFinite(n)) return "not a number";
      if (input.step === "1" && !Number.isInteger(n)) return "must be a whole number";
      const d = input.dataset;
      const out = (input.min !== "" && n < Number(input.min))
        || (input.max !== "" && n > Number(input.max))
        || (d.exclusiveminimum !== undefined && n <= Number(d.exclusiveminimum))
        || (d.exclusivemaximum !== undefined && n >= Number(d.exclusivemaximum));
      return out ? `must be ${d.rule}` : "";
    }
    const pattern = input.dataset.pattern;
    if (pattern && !new RegExp(`^(?:${pattern})$`).test(v)) return `must match ${pattern}`;
    return "";
  };
  const check = (input) => { const p = problem(input); show(input.name, p); return p; };
  for (const input of inputs) {
    input.addEventListener("blur", () => check(input));
    input.addEventListener("input", () => {
      if (input.getAttribute("aria-invalid") === "true") check(input);
    });
  }
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const bad = inputs.filter((input) => check(input));
    if (bad.length) {
      out.textContent = `${bad.length} field(s) to fix, marked in red`;
      bad[0].focus();
      return;
    }
    const values = {};
    for (const input of inputs) {
      values[input.name] = input.type === "checkbox" ? input.checked : input.value;
    }
    const button = form.querySelector("button.start");
    button.disabled = true;
    out.textContent = "asking Airflow…";
    try {
      const response = await fetch(form.dataset.startUrl, {
        method: "POST",
        credentials: "same-origin",
        headers: {"Content-Type": "application/json", "Accept": "application/json"},
        body: JSON.stringify(values),
      });
      const body = await response.json().catch(() => ({}));
      button.disabled = false;
      if (response.status === 422 && body.fields) {
        for (const [name, message] of Object.entries(body.fields)) show(name, message);
        out.textContent = "refused: see the fields marked in red";
        return;
      }
      if (!response.ok) {
        const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
        out.textContent = `refused (${response.status}): ${detail || response.statusText}`;
        return;
      }
      out.textContent = "";
      const run = document.createElement("a");
      run.href = body.url;
      run.target = "_top";
      run.textContent = `run ${body.dag_run_id}`;
      const view = document.createElement("a");
      view.href = body.view;
      view.textContent = `session ${body.session}`;
      out.append("started: ", run, " · ", view);
    } catch (err) {
      button.disabled = false;
      out.textContent = `failed: ${err}`;
    }
  });
});
"""

#: The icon of the view's entry in the Airflow navigation.
ICON = """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="#51504f"
 stroke-width="1.8"><circle cx="12" cy="12" r="9"/><circle cx="12" cy="12" r="4"/>
<path d="M12 3v3M12 18v3M3 12h3M18 12h3"/></svg>
"""


@dataclass(frozen=True)
class Links:
    """URL builders (the app gives the mounted paths; Airflow's UI base for its pages)."""

    index: str
    session: Callable[[str, str], str]
    thumbnail: Callable[[str, str, int, str], str]
    script: str
    end: Callable[[str, str], str]
    airflow: str  # the Airflow UI base, ending in "/"

    def dag(self, dag_id: str) -> str:
        return f"{self.airflow}dags/{quote(dag_id, safe='')}"

    def dag_runs(self, dag_id: str) -> str:
        return f"{self.dag(dag_id)}/runs"


def _page(title: str, body: str, *, refresh: int | None = None, script: str | None = None) -> str:
    meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    js = f'<script src="{escape(script)}" defer></script>' if script else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">{meta}'
        f"<title>{escape(title)}</title><style>{CSS}</style>{js}</head>"
        f"<body>{body}</body></html>"
    )


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M UTC")


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _state(state: str) -> str:
    cls = "open" if state != "closed" else "closed"
    label = "running" if state != "closed" else "closed"
    return f'<span class="state {cls}">{label}</span>'


def _ext(url: str, text: str) -> str:
    """A link into the Airflow UI: opens in the top window, not in the view's frame."""
    return f'<a href="{escape(url)}" target="_top">{escape(text)}</a>'


# ----------------------------------------------------------------------------- index


def index_page(microscopes: list[dict[str, Any]], links: Links, *, user: str) -> str:
    parts = [
        "<h1>Cryo-EM sessions</h1>",
        f'<p class="muted">Signed in as {escape(user)} · running and recent sessions per '
        "microscope, from the session ledger. Times in UTC.</p>",
    ]
    if not microscopes:
        parts.append("<p>No microscope's session DAG is readable for you.</p>")
    for scope in microscopes:
        parts.append(
            f"<h2>{escape(scope['name'])} <span class='muted'>({escape(scope['id'])})</span>"
            f" · {_ext(links.dag(scope['dag_id']), scope['dag_id'])}</h2>"
            f'<p><a href="{escape(links.index)}start/{escape(scope["id"])}">Start a session</a></p>'
        )
        rows = scope["sessions"]
        if not rows:
            parts.append('<p class="muted">No session yet.</p>')
            continue
        parts.append(
            "<table><tr><th class='l'>Session</th><th class='l'>State</th>"
            "<th class='l'>Opened</th><th class='l'>Closed</th><th>Movies</th><th>Copied</th>"
            "<th>Motion-corr.</th><th>CTF</th><th>Picked</th><th>Owed</th></tr>"
        )
        for s in rows:
            c = s["counts"]
            parts.append(
                "<tr>"
                f"<td class='l'><a href=\"{escape(links.session(s['microscope'], s['name']))}\">"
                f"{escape(s['name'])}</a></td><td class='l'>{_state(s['state'])}</td>"
                f"<td class='l'>{_when(s['opened_at'])}</td>"
                f"<td class='l'>{_when(s['closed_at'])}</td>"
                f"<td>{_num(c['movies'])}</td><td>{_num(c['copied'])}</td>"
                f"<td>{_num(c['motioncor'])}</td><td>{_num(c['ctf'])}</td>"
                f"<td>{_num(c['picking'])}</td>"
                f"<td class='{'warn' if c['owed'] else ''}'>{_num(c['owed'])}</td></tr>"
            )
        parts.append("</table>")
    return _page("Cryo-EM sessions", "".join(parts))


# ----------------------------------------------------------------------------- session


def _cards(counts: dict[str, Any]) -> str:
    items = [
        ("Seen on the share", counts["seen"], ""),
        ("Copied", counts["copied"], ""),
        ("Motion-corrected", counts["motion_corrected"], ""),
        ("CTF", counts["ctf"], ""),
        ("Picked", counts["picked"], ""),
        ("Archived", counts["archived"], ""),
        ("Failed", counts["failed"], "bad" if counts["failed"] else ""),
        ("Owed", counts["owed"], "warn" if counts["owed"] else ""),
    ]
    cards = []
    for label, value, cls in items:
        cards.append(
            f'<div class="card" data-count="{escape(label)}"><div class="lab">{escape(label)}'
            f'</div><div class="big {cls}">{_num(value)}</div></div>'
        )
    return '<div class="cards">' + "".join(cards) + "</div>"


def _stage_table(counts: dict[str, Any]) -> str:
    head = (
        "<table><tr><th class='l'>Step</th><th>Done</th><th>Pending</th><th>Claimed</th>"
        "<th>Failed, retrying</th><th>Failed (waits)</th><th>Owed</th></tr>"
    )
    rows = [
        "<tr><td class='l'>copy</td>"
        f"<td>{_num(counts['copied'])}</td><td>{_num(counts['settling'])}</td>"
        f"<td>{_num(counts['copying'])}</td><td>{_num(counts['copy_failed_retrying'])}</td>"
        f"<td class='{'bad' if counts['copy_failed'] else ''}'>{_num(counts['copy_failed'])}"
        f"{' + ' + _num(counts['incomplete']) + ' incomplete' if counts['incomplete'] else ''}"
        f"</td><td>{_num(counts['copying'] + counts['copy_failed_retrying'] + counts['settling'])}"
        "</td></tr>"
    ]
    labels = {"acquisition": "metadata read (XML / mdoc)"}
    for stage, d in counts["stages"].items():
        rows.append(
            f"<tr><td class='l'>{escape(labels.get(stage, stage))}</td><td>{_num(d['done'])}</td>"
            f"<td>{_num(d['pending'])}</td><td>{_num(d['submitted'])}</td>"
            f"<td>{_num(d['retrying'])}</td>"
            f"<td class='{'bad' if d['failed'] else ''}'>{_num(d['failed'])}</td>"
            f"<td>{_num(d['owed'])}</td></tr>"
        )
    return head + "".join(rows) + "</table>"


def _rates_table(rates: dict[str, Any]) -> str:
    keys = ("acquired", "copied", "motioncor", "ctf", "picking")
    acq_now = rates["per_hour"]["acquired"]
    acq_mean = rates["session_per_hour"]["acquired"]
    cells_now, cells_mean = [], []
    for k in keys:
        now, mean = rates["per_hour"][k], rates["session_per_hour"][k]
        cls_now = "bad" if k != "acquired" and acq_now and now < 0.8 * acq_now else ""
        cls_mean = "bad" if k != "acquired" and acq_mean and mean < 0.8 * acq_mean else ""
        cells_now.append(f"<td class='{cls_now}'>{_num(now)}</td>")
        cells_mean.append(f"<td class='{cls_mean}'>{_num(mean)}</td>")
    head = "".join(f"<th>{escape(k)}</th>" for k in keys)
    return (
        f"<table><tr><th class='l'>movies per hour</th>{head}</tr>"
        f"<tr><td class='l'>last {rates['window_minutes']} min to {_when(rates['end'])}</td>"
        f"{''.join(cells_now)}</tr>"
        f"<tr><td class='l'>session mean ({_num(rates['session_hours'])} h)</td>"
        f"{''.join(cells_mean)}</tr></table>"
        '<p class="muted">A step in red keeps less than 80 % of the acquisition rate.</p>'
    )


def _alerts(alerts: dict[str, Any]) -> str:
    """The session's active curation alerts (recorded by cryoflow.processing.curation)."""
    shown = [
        f'<p class="warn" data-alert="{escape(kind)}">Alert: {escape(str(a.get("message", "")))}'
        f" (since {_when(a.get('since'))})</p>"
        for kind, a in sorted(alerts.items())
        if isinstance(a, dict) and a.get("active")
    ]
    return "".join(shown)


def _thresholds(thresholds: dict[str, float], source: str) -> str:
    items = ", ".join(f"{escape(k)} = {v:g}" for k, v in thresholds.items())
    return f'<p class="muted">Thresholds ({escape(source)}): {items}.</p>'


def _result(stage: dict[str, Any] | None, key: str, fmt: str, bad: Callable[[float], bool]) -> str:
    if not stage or stage.get("state") != "done":
        return "-"
    value = (stage.get("results") or {}).get(key)
    if value is None:
        return "-"
    shown = format(value, fmt)
    return f"<span class='bad'>{shown}</span>" if bad(value) else shown


def _movie_values(m: dict[str, Any], th: dict[str, float]) -> dict[str, str]:
    st = m["stages"]
    ctf = st.get("ctf")
    defocus = "-"
    if ctf and ctf.get("state") == "done":
        r = ctf.get("results") or {}
        if r.get("defocus1_A") is not None and r.get("defocus2_A") is not None:
            um = (r["defocus1_A"] + r["defocus2_A"]) / 2e4
            out = um < th["min_defocus_um"] or um > th["max_defocus_um"]
            defocus = f"<span class='bad'>{um:.2f}</span>" if out else f"{um:.2f}"
    return {
        "drift": _result(st.get("motioncor"), "total_drift_A", ".1f",
                         lambda v: v > th["max_total_drift_A"]),
        "defocus": defocus,
        "astig": _result(ctf, "astigmatism_A", ".0f",
                         lambda v: abs(v) > th["max_astigmatism_A"]),
        "fit": _result(ctf, "fit_resolution_A", ".2f",
                       lambda v: v > th["max_fit_resolution_A"]),
        "particles": _result(st.get("picking"), "particles", "d",
                             lambda v: v < th["min_particles"]),
    }  # fmt: skip


def _log_links(m: dict[str, Any]) -> str:
    out = []
    for stage, d in m["stages"].items():
        link = d.get("log")
        label = {"motioncor": "MC", "ctf": "CTF", "picking": "picks"}.get(stage, stage)
        title = f"{stage}: {d['state']}"
        if d.get("job_id"):
            title += f", job {d['job_id']}"
            if d.get("array_index") is not None:
                title += f" task {d['array_index']}"
        if d.get("error"):
            title += f" - {d['error']}"
        cls = {"failed": "bad", "done": "", "pending": "muted", "submitted": "warn"}.get(
            d["state"], ""
        )
        if link:
            out.append(
                f'<a class="{cls}" href="{escape(link)}" target="_top" title="{escape(title)}">'
                f"{escape(label)}</a>"
            )
        else:
            out.append(f'<span class="{cls}" title="{escape(title)}">{escape(label)}</span>')
    return " ".join(out) or "-"


def _tiles(scope: str, name: str, movies: list[dict[str, Any]], links: Links,
           th: dict[str, float]) -> str:  # fmt: skip
    if not movies:
        return '<p class="muted">No motion-corrected micrograph yet.</p>'
    tiles = []
    for m in movies:
        v = _movie_values(m, th)
        imgs = []
        for kind, alt in (("micrograph", "micrograph"), ("spectrum", "power spectrum"),
                          ("picks", "picks")):  # fmt: skip
            if kind == "spectrum" and m["stages"].get("ctf", {}).get("state") != "done":
                continue
            if kind == "picks" and m["stages"].get("picking", {}).get("state") != "done":
                continue
            url = links.thumbnail(scope, name, m["file_id"], kind)
            imgs.append(
                f'<a href="{escape(url)}" target="_blank" rel="noopener">'
                f'<img loading="lazy" src="{escape(url)}" alt="{alt}" title="{alt}" '
                f'width="170" height="170"></a>'
            )
        tiles.append(
            f'<div class="tile" data-file-id="{m["file_id"]}"><div class="imgs">'
            f'{"".join(imgs)}</div><div class="cap"><b title="{escape(m["relpath"])}">'
            f'{escape(m["relpath"].rsplit("/", 1)[-1])}</b><br>{_when(m["acquired_at"])} · '
            f"drift {v['drift']} Å · defocus {v['defocus']} µm · astig {v['astig']} Å · "
            f"fit {v['fit']} Å · {v['particles']} particles · logs: {_log_links(m)}</div></div>"
        )
    return '<div class="tiles">' + "".join(tiles) + "</div>"


def _movie_table(movies: list[dict[str, Any]], th: dict[str, float], older: str | None) -> str:
    if not movies:
        return '<p class="muted">No copied movie yet.</p>'
    rows = [
        "<div class='scroll'><table class='movies'><tr><th class='l'>Movie</th>"
        "<th class='l'>Acquired</th>"
        "<th>Drift Å</th><th>Defocus µm</th><th>Astig. Å</th><th>Fit Å</th>"
        "<th>Particles</th><th class='l'>Verdict</th><th class='l'>Task logs</th></tr>"
    ]
    for m in movies:
        v = _movie_values(m, th)
        version = f" (v{m['version']})" if m.get("version", 1) > 1 else ""
        if m.get("accepted") is None:
            verdict = "<td class='l muted'>pending</td>"
        elif m["accepted"]:
            verdict = "<td class='l' data-verdict='accepted'>accepted</td>"
        else:
            reason = escape(m.get("reject_reason") or "")
            verdict = (
                f"<td class='l bad reason' data-verdict='rejected' title='{reason}'>"
                f"rejected: {reason}</td>"
            )
        rows.append(
            f"<tr data-file-id='{m['file_id']}'><td class='l' title='{escape(m['relpath'])}'>"
            f"{escape(m['relpath'].rsplit('/', 1)[-1])}{version}</td>"
            f"<td class='l'>{_when(m['acquired_at'])}</td><td>{v['drift']}</td>"
            f"<td>{v['defocus']}</td><td>{v['astig']}</td><td>{v['fit']}</td>"
            f"<td>{v['particles']}</td>{verdict}<td class='l'>{_log_links(m)}</td></tr>"
        )
    rows.append("</table></div>")  # wide tables scroll inside the page, the Verdict in reach
    if older:
        rows.append(f'<p><a href="{escape(older)}">older movies →</a></p>')
    return "".join(rows)


def _bytes(n: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _archive_section(archive: dict[str, Any]) -> str:
    """Tape and the microscope's disk: what is tagged for HSM, the small-file tar, what the HSM
    node reports, and how much of the share this session can free."""
    disk, cleanup, done = archive["disk"], archive["cleanup"], archive.get("summary") or {}
    rows = []
    tags = done.get("tags")
    if tags:
        untagged = tags["untagged"] + tags["partially_tagged"]
        rows.append(("Tagged for HSM (read back from the files)",
                     f"{tags['tagged']} files" + (f", <span class='bad'>{untagged} not</span>"
                                                  if untagged else "")))  # fmt: skip
    tar = done.get("small_files_tar")
    if tar:
        rows.append(("Small files in one tar", f"{tar['members']} files, {_bytes(tar['bytes'])}"
                     + ("" if tar["tagged"] else " <span class='bad'>(not tagged)</span>")))
    hsm = done.get("hsm")
    if hsm:
        if hsm.get("error"):
            state = f"<span class='bad'>failed: {escape(hsm['error'])}</span>"
        else:
            counts = ", ".join(f"{n} {escape(k)}" for k, n in hsm["files"].items() if n)
            state = (counts or "no files") + (
                "" if hsm["ok"] else " <span class='warn'>(incomplete: see hsm_report.json)</span>"
            )
        rows.append((f"HSM node ({escape(hsm['mode'])}, dsmls)", state))
    if not rows:
        rows.append(("Archive", "<span class='muted'>reported when the session closes</span>"))
    rows += [
        ("Verified on GPFS", _bytes(disk["verified_bytes"])),
        ("Freed from the microscope's disk", _bytes(disk["freed_bytes"])),
        ("Safe to free now (every check at the destination passed at cleanup's last run)",
         _bytes(disk["safe_to_free_bytes"])),
        ("Kept on the microscope by cleanup (its log says why)", _bytes(disk["kept_bytes"])),
        (f"Not checked by cleanup yet (verified more than {cleanup['min_age_hours']:g} h ago, "
         "closed)", _bytes(disk["unchecked_bytes"])),  # fmt: skip
        ("Share cleanup", escape(str(cleanup["mode"]))),
    ]
    cells = "".join(
        f"<tr><td class='l'>{label}</td><td class='l'>{value}</td></tr>" for label, value in rows
    )
    return f"<h2>Archive and disk</h2><table class='archive'>{cells}</table>"


def session_page(
    *,
    session: dict[str, Any],
    scope_name: str,
    summary: dict[str, Any],
    plot_data: dict[str, Any],
    thresholds: dict[str, float],
    threshold_source: str,
    latest: list[dict[str, Any]],
    movies: list[dict[str, Any]],
    older: str | None,
    links: Links,
    can_end: bool,
    generated: str,
    archive: dict[str, Any] | None = None,
) -> str:
    scope, name = session["microscope"], session["name"]
    counts, rates = summary["counts"], summary["rates"]
    running = session["state"] != "closed"
    params = session["params"]
    facts = [
        f"{escape(scope_name)}",
        f"opened {_when(session['opened_at'])}",
    ]
    if session["closed_at"]:
        why = escape(session["close_reason"] or "")
        facts.append(f"closed {_when(session['closed_at'])} ({why})")
    for key, label in (("project", "project"), ("sample", "sample")):
        if params.get(key):
            facts.append(f"{label} {escape(str(params[key]))}")
    if params.get("pixel_size_A"):
        facts.append(f"{params['pixel_size_A']:g} Å/px")
    end = ""
    if running:
        if session.get("end_requested"):
            end = f'<p class="warn">End requested: {escape(session["end_requested"])}</p>'
        elif can_end:
            end = (
                f'<p><button class="end" data-end-url="{escape(links.end(scope, name))}" '
                f'data-session="{escape(name)}">End session now</button>'
                '<span id="end-result" aria-live="polite"></span></p>'
            )
        else:
            end = (
                '<p class="muted">Ending a session needs the right to trigger '
                f"end_session_{escape(scope)}.</p>"
            )
    airflow = " · ".join([
        _ext(links.dag(f"session_{scope}"), f"session_{scope} runs"),
        _ext(links.dag(f"process_{scope}"), f"process_{scope} runs"),
        _ext(links.dag(f"end_session_{scope}"), f"end_session_{scope} runs"),
    ])  # fmt: skip
    figures = []
    for key in ("total_drift", "defocus", "astigmatism", "fit_resolution", "particles"):
        metric = plot_data.get(key)
        if metric is None:
            continue
        missing = ""
        if metric["missing"]:
            missing = f'<p class="muted">{metric["missing"]} without a value (e.g. no fit).</p>'
        figures.append(
            f'<div class="pair" data-metric="{key}">{plots.series_svg(metric)}'
            f"{plots.histogram_svg(metric)}</div>{missing}"
        )
    body = [
        f'<p><a href="{escape(links.index)}">← all sessions</a></p>',
        f"<h1>{escape(name)} {_state(session['state'])}</h1>",
        f'<p class="muted">{" · ".join(facts)}<br>Airflow: {airflow}</p>',
        end,
        _alerts(session.get("curation_alerts") or {}),
        "<h2>Movies</h2>",
        _cards(counts),
        "<h3>Per step</h3>",
        _stage_table(counts),
        "<h2>Rates</h2>",
        _rates_table(rates),
        plots.rates_svg(rates["hourly"]),
        "<h2>Quality</h2>",
        _thresholds(thresholds, threshold_source),
        '<div class="plots">' + "".join(figures) + "</div>",
        "<h2>Latest micrographs</h2>",
        '<p class="muted">Motion-corrected sum · CTFFIND power spectrum (left: data, right: '
        "fit) · picks.</p>",
        _tiles(scope, name, latest, links, thresholds),
        "<h2>Movies, newest first</h2>",
        _movie_table(movies, thresholds, older),
        _archive_section(archive) if archive is not None else "",
        f'<p class="muted">Generated {escape(generated)}'
        f"{' · refreshes every minute' if running else ''}.</p>",
    ]
    return _page(f"{name} · {scope}", "".join(body), refresh=60 if running else None,
                 script=links.script)  # fmt: skip


def start_page(scope_name: str, microscope: str, form: str, links: Links) -> str:
    dag_id = f"session_{microscope}"
    body = (
        f'<p><a href="{escape(links.index)}">← all sessions</a></p>'
        f"<h1>Start a session on {escape(scope_name)}</h1>"
        f'<p class="muted">Triggers {_ext(links.dag(dag_id), dag_id)}'
        " (switched on if it is off). The defaults come from the microscope's configuration; "
        "optional fields may stay empty. Each value is checked as you leave its field.</p>"
        f"{form}"
    )
    return _page(f"Start · {microscope}", body, script=links.script)


def error_page(status: int, message: str, login: str | None) -> str:
    link = f'<p><a href="{escape(login)}" target="_top">Sign in to Airflow</a></p>' if login else ""
    return _page(f"{status}", f"<h1>{status}</h1><p>{escape(message)}</p>{link}")


__all__ = ["ICON", "SCRIPT", "Links", "error_page", "index_page", "session_page", "start_page"]
