"""The explorer's jobs view: announced jobs with progress, throughput and replication over
time, as far as the publishers' signed announcements tell (pure: a snapshot document in,
HTML out; every string from the network is escaped).
"""

from __future__ import annotations

import html
from typing import Any

WHAT_PUBLIC_MESSAGES_TELL = (
    "<details open id='jobs-limits'><summary>What public messages can and cannot tell</summary>"
    "<p>Everything here comes from the job announcements publishers sign and gossip every few "
    "minutes: shards in the job and shards not yet accepted, the quorum (agreeing results "
    "needed per shard), the credit rate, the model's digest and size, and the expiry. The "
    "explorer checks each signature; the counts are still the publisher's own claim.</p>"
    "<p>Throughput is shards accepted between two announcements heard, divided by the time "
    "between them, so it is only as fine as the announcement interval. Replication is shown "
    "as <i>quorum x shards done</i>: the fewest agreeing results the publisher says it "
    "accepted. Public messages cannot tell which nodes computed which shard, how many extra "
    "replicas secret re-checks and audits added (they are secret so that workers cannot "
    "tell them apart), the results themselves, or anything about a job after its "
    "publisher stops announcing it: a publisher does not announce an ended job again, so "
    "a job that finished shows its last announcement heard until that expires.</p>"
    "</details>")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def throughput(heard: list[dict]) -> float | None:
    """Shards accepted per minute between the first and the last announcement heard."""
    if len(heard) < 2 or heard[-1]["t"] <= heard[0]["t"]:
        return None
    return (heard[0]["shards_left"] - heard[-1]["shards_left"]) / (heard[-1]["t"] - heard[0]["t"]) * 60


def progress_svg(job: dict, width: int = 320, height: int = 90) -> str:
    """Shards done (blue) and the replication floor quorum x done (grey, right axis scale
    in results) over the time the announcements were heard."""
    heard = job.get("heard") or []
    total = max(1, int(job["shards_total"]))
    quorum = max(1, int(job["quorum"]))
    if not heard:
        return ""
    pad = 24
    t0, t1 = heard[0]["t"], heard[-1]["t"]
    span = (t1 - t0) or 1.0

    def x(t: float) -> float:
        return pad + (t - t0) / span * (width - 2 * pad)

    def y(done: float) -> float:
        return height - pad - done / total * (height - 2 * pad)

    pts = []
    for h in heard:  # a step line: done stays until the next announcement says otherwise
        done = total - int(h["shards_left"])
        if pts:
            pts.append(f"{x(h['t']):.1f},{pts[-1].split(',')[1]}")
        pts.append(f"{x(h['t']):.1f},{y(done):.1f}")
    last = heard[-1]
    done_now = total - int(last["shards_left"])
    dots = "".join(
        f'<circle cx="{x(h["t"]):.1f}" cy="{y(total - int(h["shards_left"])):.1f}" r="2.5" '
        f'fill="#26a"><title>{total - int(h["shards_left"])} of {total} shards done, '
        f'at least {quorum * (total - int(h["shards_left"]))} agreeing results</title></circle>'
        for h in heard)
    return (f'<svg class="job-chart" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-label="shards done over time">'
            f'<rect width="{width}" height="{height}" fill="#fafafa"/>'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>'
            f'<text x="2" y="{pad - 6}" font-size="10">{total} shards</text>'
            f'<text x="2" y="{height - pad + 4}" font-size="10">0</text>'
            f'<text x="{pad}" y="{height - 6}" font-size="10">heard over {span:.0f} s</text>'
            f'<text x="{width - pad - 90}" y="{height - 6}" font-size="10">'
            f'{done_now} done, ≥{done_now * quorum} results</text>'
            f'<polyline fill="none" stroke="#26a" stroke-width="2" points="{" ".join(pts)}"/>'
            f"{dots}</svg>")


def jobs_html(doc: dict, human_time: Any) -> str:
    """The /jobs page body; `human_time(t)` formats a Unix time for people."""
    if not doc["jobs"]:
        return ("<p>No job announcements heard yet (publishers announce every few minutes).</p>"
                + WHAT_PUBLIC_MESSAGES_TELL)
    cards = []
    for j in doc["jobs"]:
        heard = j.get("heard") or []
        rate = throughput(heard)
        rate_s = f"{rate:.2f} shards/min" if rate is not None else "- (one announcement heard)"
        left = j["shards_left"]
        eta = ("" if not (rate and rate > 0 and left) else
               "; at this rate under a minute left" if left / rate < 1 else
               f"; at this rate about {left / rate:.0f} min left")
        rows = [
            ("publisher", f'<code>{_e(j["publisher"])}</code>'),
            ("progress", f"<progress max='{int(j['shards_total'])}' value='{int(j['shards_done'])}'>"
                         f"</progress> {int(j['shards_done'])} done, {int(left)} left of "
                         f"{int(j['shards_total'])} shards ({float(j['progress']) * 100:.0f} %)"),
            ("throughput", _e(rate_s + eta)),
            ("replication", f"quorum {int(j['quorum'])}: at least "
                            f"{int(j['quorum']) * int(j['shards_done'])} agreeing results accepted"),
            ("credit rate", f"{int(j['credit_rate'])} credit units per compute unit"),
            ("model", f"<code>{_e(j['model_digest'][:16])}…</code> "
                      f"({int(j['model_size']) / 1024:.1f} KiB)"),
            ("first heard", _e(human_time(j.get("first_heard_at")))),
            ("last announcement", _e(human_time(j["heard_at"])) + f" (seq {int(j['seq'])})"),
            ("announcement expires", _e(human_time(j["exp_ms"] / 1000))),
        ]
        table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
        cards.append(f'<section class="job"><h2>job <code>{_e(j["job_id"])}</code></h2>'
                     f'<div class="wide"><table>{table}</table></div>'
                     f'<h3>Progress over time</h3>{progress_svg(j)}</section>')
    summary = "".join(
        f"<tr><td><code>{_e(j['job_id'][:16])}</code></td>"
        f"<td><progress max='{int(j['shards_total'])}' value='{int(j['shards_done'])}'></progress> "
        f"{int(j['shards_done'])}/{int(j['shards_total'])}</td><td>{int(j['shards_left'])}</td>"
        f"<td>{int(j['quorum'])}</td><td>{int(j['credit_rate'])}</td></tr>" for j in doc["jobs"])
    return (f'<div class="wide"><table id="jobs"><tr><th>job</th><th>progress (shards done)</th>'
            f"<th>shards left</th><th>quorum</th><th>credit rate</th></tr>{summary}</table></div>"
            + WHAT_PUBLIC_MESSAGES_TELL + "".join(cards))
