"""The dashboard's one HTML page, rendered on the server from a :class:`producer.dashboard.Snapshot`.

No external resource: inline CSS, progress bars as nested ``<span>`` widths, and one small inline script
that fetches the page again every ``refresh_s`` seconds and swaps its body in (same origin: the browser
sends its basic-auth credentials; no reload, so the scroll position stays); without scripts a
``<noscript>`` meta refresh reloads it. Every text from the queue (job ids, failure reasons, file names,
worker names) is HTML-escaped.

Sections, in order: queues (depths, workers alive, chunks in flight), jobs (one row each: progress bar of
done / failed / running / queued units, rate, ETA, age, gallery link for segment jobs), failures (per job:
groups by reason, count, permanent or for now, example units), workers (heartbeat age, the job and chunk
held, units done, rate).
"""

from __future__ import annotations

import html
from datetime import datetime, timezone

STYLE = """body{font-family:system-ui,sans-serif;margin:16px 20px;background:#f7f7f7;color:#222;font-size:14px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:18px 0 6px}h3{font-size:14px;margin:10px 0 4px}
.meta{color:#555}.meta a{color:#2451a6}table{border-collapse:collapse;background:#fff;border:1px solid #ddd;
width:100%}th,td{padding:5px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:middle}
th{background:#fafafa;font-weight:600;font-size:13px;color:#444}td.num,th.num{text-align:right;
font-variant-numeric:tabular-nums}code{font-size:12px}.bar{display:flex;width:260px;height:12px;
background:#e6e6e6;border-radius:3px;overflow:hidden}.bar span{display:block;height:100%}.done{background:#2e9d5b}
.failed{background:#d64545}.running{background:#3b7dd8}.queued{background:#9dbbe8}.counts{font-size:12px;
color:#555;margin-top:2px}.pill{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;
background:#e8e8e8}.pill.active{background:#d9e8fb;color:#1d4f91}.pill.finished{background:#dcf1e3;
color:#1c6b3c}.pill.lost,.pill.dead{background:#fbdede;color:#9b1c1c}.pill.alive{background:#dcf1e3;
color:#1c6b3c}.queues span{display:inline-block;margin-right:18px}.queues b{font-size:18px}
.errors{background:#fff4e5;border:1px solid #f0c080;padding:6px 10px;margin:8px 0}.none{color:#777;font-style:italic}
.reason{max-width:560px;word-break:break-word}"""
# every %d ms: the page again, its body swapped in (a failed fetch keeps the old one; the next one retries)
REFRESH = ("setInterval(async()=>{try{const r=await fetch(location.origin+location.pathname,{cache:'no-store'});if(r.ok){"
           "const page=new DOMParser().parseFromString(await r.text(),'text/html');"
           "document.body.replaceWith(document.importNode(page.body,true))}}catch(e){}},%d)")


def render_page(snap, config) -> str:
    """The whole page for ``snap`` (a Snapshot) under ``config`` (a DashboardConfig)."""
    read_at = datetime.fromtimestamp(snap.taken, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    errors = "".join(f"<div class=errors><b>{html.escape(part)}</b> could not be read: {html.escape(text)}</div>"
                     for part, text in snap.errors.items())
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>SLIP queue</title>'
            f'<noscript><meta http-equiv="refresh" content="{config.refresh_s}"></noscript>'
            f"<style>{STYLE}</style><script>{REFRESH % (config.refresh_s * 1000)}</script></head>\n<body>\n<header><h1>SLIP queue</h1><div class=meta>read at {read_at}; "
            f'reloads every {config.refresh_s} s; <a href="metrics">Prometheus metrics</a>; Flower has the '
            f"task-level view</div></header>\n{errors}"
            f"{_queues(snap)}{_jobs(snap.jobs)}{_failures(snap)}{_workers(snap.workers)}</body></html>\n")


def _queues(snap) -> str:
    alive = sum(w.alive for w in snap.workers)
    in_flight = sum(r.in_flight for r in snap.jobs)
    depths = "".join(f"<span>{html.escape(q)}: <b>{n:,}</b> waiting</span>" for q, n in sorted(snap.depths.items()))
    return (f'<section id="queues"><h2>Queues</h2><div class=queues>{depths or "<span class=none>unknown</span>"}'
            f"<span>workers alive: <b>{alive}</b> of {len(snap.workers)}</span>"
            f"<span>chunks in flight: <b>{in_flight:,}</b></span></div></section>\n")


def _jobs(rows) -> str:
    if not rows:
        return '<section id="jobs"><h2>Jobs</h2><p class=none>no jobs</p></section>\n'
    head = ("<tr><th>job</th><th>kind</th><th>state</th><th>progress</th><th class=num>rate</th>"
            "<th class=num>ETA</th><th class=num>age</th><th></th></tr>")
    return f'<section id="jobs"><h2>Jobs</h2><table>{head}{"".join(map(_job_row, rows))}</table></section>\n'


def _job_row(row) -> str:
    unit = f"{row.unit}s"
    parts = (("done", row.done), ("failed", row.failed), ("running", row.running), ("queued", row.queued))
    bar = "".join(f'<span class="{name}" style="width:{100 * n / row.total:.2f}%" title="{n:,} {name}"></span>'
                  for name, n in parts if n and row.total)
    counts = f"{row.done:,} of {row.total:,} {unit} done" + (f", {row.failed:,} failed" if row.failed else "")
    if row.running or row.queued or row.waiting:
        counts += f"; {row.running:,} running, {row.queued:,} queued, {row.waiting:,} waiting"
    rate = "" if row.rate is None else f"{row.rate:,.2f} {unit}/s"
    gallery = (f'<a href="jobs/{html.escape(row.job_id)}/gallery/">gallery</a>'
               if row.kind == "segment" and row.done else "")
    return (f'<tr id="job-{html.escape(row.job_id)}"><td><code>{html.escape(row.job_id)}</code></td>'
            f"<td>{html.escape(row.kind)}</td><td><span class='pill {html.escape(row.state)}'>{html.escape(row.state)}"
            f"</span></td><td><div class=bar>{bar}</div><div class=counts>{counts}</div></td>"
            f"<td class=num>{rate}</td><td class=num>{_duration(row.eta_s)}</td><td class=num>{_duration(row.age_s)}</td>"
            f"<td>{gallery}</td></tr>")


def _failures(snap) -> str:
    if not snap.failures:
        return ""
    blocks = []
    for job_id, groups in snap.failures.items():
        rows = "".join(
            f"<tr><td class=reason>{html.escape(g.reason)}</td><td class=num>{g.count:,}</td>"
            f"<td>{'permanent' if g.permanent else 'for now (retryable)'}</td>"
            f"<td>{', '.join(html.escape(name or f'#{index}') for index, name in g.examples)}</td></tr>"
            for g in groups)
        blocks.append(f'<h3>job <code>{html.escape(job_id)}</code></h3><table><tr><th>reason</th>'
                      f"<th class=num>units</th><th>failure</th><th>examples</th></tr>{rows}</table>")
    return f'<section id="failures"><h2>Failures by reason</h2>{"".join(blocks)}</section>\n'


def _workers(rows) -> str:
    if not rows:
        return '<section id="workers"><h2>Workers</h2><p class=none>no worker has beaten in the last hour</p></section>\n'
    head = ("<tr><th>worker</th><th>host</th><th>state</th><th class=num>heartbeat</th><th>holds</th>"
            "<th class=num>units done</th><th class=num>rate</th></tr>")
    body = "".join(
        f"<tr><td><code>{html.escape(w.node)}</code></td><td>{html.escape(w.host)}</td>"
        f"<td><span class='pill {'alive' if w.alive else 'dead'}'>{'alive' if w.alive else 'dead'}</span></td>"
        f"<td class=num>{w.heartbeat_age_s:.1f} s ago</td>"
        f"<td>{'' if w.job is None else f'<code>{html.escape(w.job)}</code> chunk {w.chunk}'}</td>"
        f"<td class=num>{w.units:,}</td><td class=num>{w.rate:,.2f} units/s</td></tr>" for w in rows)
    return f'<section id="workers"><h2>Workers</h2><table>{head}{body}</table></section>\n'


def _duration(seconds: float | None) -> str:
    """``95`` -> ``1 min 35 s``; None -> ``""``."""
    if seconds is None:
        return ""
    s = int(round(seconds))
    for size, name, small, small_name in ((86400, "d", 3600, "h"), (3600, "h", 60, "min"), (60, "min", 1, "s")):
        if s >= size:
            rest = (s % size) // small
            return f"{s // size} {name}" + (f" {rest} {small_name}" if rest else "")
    return f"{s} s"
