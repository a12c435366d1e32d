"""One evidence item as a page: the signed messages it rests on, opened again here, and why
they prove what is claimed (pure; evidence is hostile input, so every value is escaped and
every envelope is re-verified rather than trusted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
from typing import Any

from ..identity import peer_id_from_key
from ..wire import errors as E
from ..wire.envelope import open_envelope

WHY = {
    "equivocation": (
        "Every envelope below is signed by the accused's own key (verified again on this "
        "page) and they carry the same sequence number with different bodies. Only the "
        "holder of that key can sign, and a correct node never signs two different records "
        "with one sequence number, so the accused equivocated. The explorer checked this "
        "itself."),
    "wrong_key": (
        "A DHT server returned, under the accused peer's key, a capacity record signed by "
        "another key (shown below). Replies arrive over authenticated connections, so the "
        "explorer knows which server sent it; a record under a key must be signed by that "
        "key, so serving it is misbehaviour. The explorer checked this itself."),
}
PUBLISHER_CLAIM = (
    "This is a publisher's signed claim, not the explorer's own finding. The explorer "
    "checked that the report is signed by the publisher and that every proof below is signed "
    "by the accused; whether those signed results are wrong is the publisher's judgement "
    "(it re-ran or compared them), which the explorer cannot repeat without the job's data.")
MAX_HEX = 96  # characters of one bytes field shown in a table (the whole envelope is below)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def evidence_id(item: dict) -> str:
    """A stable id for an evidence item of the snapshot document (for its page's address)."""
    h = hashlib.sha256()
    for part in (item["kind"], item["accused"], item["verified_by"], *item["proofs"]):
        h.update(str(part).encode() + b"\0")
    return h.hexdigest()[:16]


def _value(v: Any) -> str:
    if isinstance(v, (bytes, bytearray)):
        x = bytes(v).hex()
        return x if len(x) <= MAX_HEX else f"{x[:MAX_HEX]}… ({len(v)} bytes)"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(i) for i in v[:20]) + (", …" if len(v) > 20 else "") + "]"
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return "{" + ", ".join(f"{f.name}: {_value(getattr(v, f.name))}"
                               for f in dataclasses.fields(v)) + "}"
    return str(v)


def _fields(hexed: str, network: str) -> list[tuple[str, str]] | None:
    try:
        body = open_envelope(bytes.fromhex(hexed), network).body
    except (ValueError, E.WireError):
        return None
    return ([(f.name, _value(getattr(body, f.name))) for f in dataclasses.fields(body)]
            if dataclasses.is_dataclass(body) else [("body", _value(body))])


def differing(proofs: list[str], network: str) -> set[str]:
    """Body fields whose values differ between the proofs that open (what conflicts)."""
    seen: dict[str, set[str]] = {}
    for hexed in proofs:
        for k, v in _fields(hexed, network) or []:
            seen.setdefault(k, set()).add(v)
    return {k for k, vs in seen.items() if len(vs) > 1} if len(proofs) > 1 else set()


def proof_html(i: int, hexed: str, network: str, differs: set[str] = frozenset()) -> str:
    """One proof envelope, opened again: kind, signer, body fields (those that differ from
    the other proofs marked); or why it does not open."""
    try:
        raw = bytes.fromhex(hexed)
        opened = open_envelope(raw, network)
    except (ValueError, E.WireError) as exc:
        return (f'<section class="proof"><h3>proof {i + 1}: does not open</h3>'
                f"<p>{_e(exc)}</p></section>")
    fields = _fields(hexed, network) or []
    rows = "".join(
        f'<tr{" class=differs" if k in differs else ""}><th>{_e(k)}</th><td><code>{_e(v)}</code>'
        f'{" ← differs" if k in differs else ""}</td></tr>' for k, v in fields)
    return (f'<section class="proof"><h3>proof {i + 1}: a signed <code>{_e(opened.kind)}</code> '
            f"v{int(opened.version)}</h3><p>Signed by <code>{_e(peer_id_from_key(opened.signer))}"
            f"</code>; signature verified on this page.</p>"
            f'<div class="wide"><table>{rows}</table></div>'
            f"<details><summary>the whole envelope ({len(raw)} bytes, hex)</summary>"
            f"<pre>{_e(hexed)}</pre></details></section>")


def evidence_item_html(item: dict, network: str) -> str:
    """The /evidence/<id> page body."""
    own = item["verified_by_explorer"]
    who = ("this explorer, from the signed messages below" if own else
           f"a claim signed by publisher <code>{_e(item['verified_by'])}</code>")
    why = WHY.get(item["kind"], "") if own else PUBLISHER_CLAIM
    served = ", ".join(f"<code>{_e(s)}</code>" for s in item["served_by"]) or "-"
    rows = [("what", _e(item["kind"])),
            ("accused", f'<a href="/peers/{_e(item["accused"])}"><code>{_e(item["accused"])}'
                        f"</code></a>"),
            ("who says so", who), ("detail", _e(item["detail"])), ("served by", served),
            ("signed messages", str(len(item["proofs"])))]
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    differs = differing(item["proofs"], network)
    proofs = "".join(proof_html(i, p, network, differs) for i, p in enumerate(item["proofs"]))
    return (f'<div class="wide"><table id="evidence-item">{table}</table></div>'
            f'<h2>Why this proves it</h2><p id="why">{_e(why)}</p>'
            f"<h2>The signed messages</h2>{proofs or '<p>None attached.</p>'}"
            f'<p><a href="/api/evidence">All evidence as JSON</a> (proofs as envelope hex).</p>')
