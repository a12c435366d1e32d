"""Durations as people read them ("45 s", "12 min", "3 h 5 min", "4 days"), for the faces
that show times: the explorer's pages and the owner's dashboard."""

from __future__ import annotations


def span(seconds: float) -> str:
    """A duration, rounded to what a reader needs: seconds under 90 s, minutes under 90
    min, hours and minutes under two days, else days. The sign is dropped (the caller says
    "ago" or "in")."""
    s = int(abs(seconds))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{round(s / 60)} min"
    if s < 48 * 3600:
        return f"{s // 3600} h {s // 60 % 60} min"
    return f"{s // 86400} days"
