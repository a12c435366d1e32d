"""Capacity over the day as a picture, with the standard library only (matplotlib is no
dependency of the project, and one chart does not warrant one).

`svg()` draws labelled axes; `png()` the same chart without text (a PNG written by hand:
zlib and struct). Both take the share of the fleet available (policy computing) and used
(a lease computing) per bin, and return bytes or text for the caller to write.
"""

from __future__ import annotations

import struct
import zlib

W, H, PAD = 960, 360, 40
AVAILABLE = (120, 170, 230)   # light blue: the policy lets the car compute
USED = (20, 70, 150)          # dark blue: a lease is computing
GRID = (200, 200, 200)


def _check(available: list[float], used: list[float]) -> None:
    if not available or len(available) != len(used):
        raise ValueError("plot: need one 'used' share per 'available' share, at least one")


def png(available: list[float], used: list[float], bin_s: int = 900) -> bytes:
    """A PNG: one bar per bin (available behind used), grid lines every 3 hours and at
    10 % steps of the fleet."""
    _check(available, used)
    top = max(0.05, max(available))
    px = [[(255, 255, 255)] * W for _ in range(H)]
    plot_w, plot_h = W - 2 * PAD, H - 2 * PAD
    for step in range(0, 11):
        y = H - PAD - int(plot_h * (step / 10) / top)
        if PAD <= y < H - PAD + 1:
            for x in range(PAD, W - PAD):
                px[y][x] = GRID
    per_3h = 3 * 3600 / bin_s
    n = len(available)
    for i, (a, u) in enumerate(zip(available, used)):
        x0, x1 = PAD + plot_w * i // n, PAD + plot_w * (i + 1) // n
        if i % per_3h == 0:
            for y in range(PAD, H - PAD):
                px[y][x0] = GRID
        for share, colour in ((a, AVAILABLE), (u, USED)):
            h = int(plot_h * min(share, top) / top)
            for y in range(H - PAD - h, H - PAD):
                for x in range(x0, max(x1 - 1, x0 + 1)):
                    px[y][x] = colour
    raw = b"".join(b"\x00" + bytes(c for p in row for c in p) for row in px)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def svg(available: list[float], used: list[float], bin_s: int = 900, title: str = "") -> str:
    """An SVG with axes: hours on x, share of the fleet on y."""
    _check(available, used)
    top = max(0.05, max(available))
    plot_w, plot_h = W - 2 * PAD, H - 2 * PAD
    n = len(available)
    bw = plot_w / n
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           'font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{PAD}" y="16">{title}</text>']
    for step in range(0, 11):
        v = step / 10
        if v > top:
            break
        y = H - PAD - plot_h * v / top
        out.append(f'<line x1="{PAD}" x2="{W - PAD}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ccc"/>'
                   f'<text x="4" y="{y + 4:.1f}">{v:.0%}</text>')
    for i, (a, u) in enumerate(zip(available, used)):
        x = PAD + i * bw
        for share, colour in ((a, AVAILABLE), (u, USED)):
            h = plot_h * min(share, top) / top
            out.append(f'<rect x="{x:.1f}" y="{H - PAD - h:.1f}" width="{bw * 0.9:.2f}" '
                       f'height="{h:.1f}" fill="rgb{colour}"/>')
        if (i * bin_s) % (3 * 3600) == 0:
            out.append(f'<text x="{x:.1f}" y="{H - PAD + 14}">{i * bin_s // 3600 % 24:02d}h'
                       '</text>')
    out.append(f'<text x="{W - PAD - 260}" y="16" fill="rgb{AVAILABLE}">available (policy '
               f'allows)</text><text x="{W - PAD - 110}" y="16" fill="rgb{USED}">used '
               '(computing)</text></svg>')
    return "\n".join(out)
