"""Reading a task's cards back the way a user would, and looking inside them."""

from __future__ import annotations

import base64
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

_READER = """
import json, sys
from metaflow import Flow, namespace
from metaflow.cards import get_cards
from metaflow.plugins.cards.exception import CardNotPresentException

namespace(None)
run = Flow(sys.argv[1]).latest_run
out = []
for task in run[sys.argv[2]]:
    try:
        cards = list(get_cards(task))
    except CardNotPresentException:
        cards = []
    out += [{"id": c.id, "type": c.type, "html": c.get(), "pathspec": task.pathspec}
            for c in cards]
print(json.dumps(out))
"""


def read_cards(flow: str, step: str, *, env: dict[str, str], cwd: Path) -> list[dict[str, Any]]:
    """The cards of every task of ``step`` in the latest run, via ``metaflow.cards.get_cards``.

    Read in a child process with the flow's environment: Metaflow reads its datastore
    settings once, at import.
    """
    out = subprocess.run([sys.executable, "-c", _READER, flow, step], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cards: list[dict[str, Any]] = json.loads(out.stdout.strip().splitlines()[-1])
    return cards


_DATA = re.compile(r'window\.__MF_DATA__\["[^"]+"\] = "([A-Za-z0-9+/=]+)"')


def card_payload(html: str) -> dict[str, Any]:
    """The components a Metaflow card page embeds (base64 JSON), decoded."""
    m = _DATA.search(html)
    assert m, "no embedded card data in the HTML"
    payload: dict[str, Any] = json.loads(base64.b64decode(m.group(1)))
    return payload


def components(payload: Any) -> list[dict[str, Any]]:
    """Every component in a card payload, depth first."""
    out: list[dict[str, Any]] = []
    if isinstance(payload, dict):
        if "type" in payload:
            out.append(payload)
        for v in payload.values():
            out += components(v)
    elif isinstance(payload, list):
        for v in payload:
            out += components(v)
    return out


def by_id(payload: dict[str, Any], component_id: str) -> dict[str, Any]:
    found = [c for c in components(payload) if c.get("id") == component_id]
    assert len(found) == 1, f"{component_id}: {len(found)} found"
    return found[0]


# -- a tiny PNG reader, enough to tell a rendered page from a blank one ----------------

def png_colours(path: Path, *, max_rows: int | None = None) -> tuple[int, int, set[bytes]]:
    """Width, height and the distinct pixel colours of an 8-bit RGB(A) PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, [], 0
    height = bit_depth = colour_type = interlace = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, bit_depth, colour_type, _c, _f, interlace = struct.unpack(
                ">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    assert bit_depth == 8 and colour_type in (2, 6) and interlace == 0, (
        bit_depth, colour_type, interlace)
    bpp = 3 if colour_type == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    prev = bytearray(stride)
    colours: set[bytes] = set()
    rows = height if max_rows is None else min(height, max_rows)
    for y in range(rows):
        start = y * (stride + 1)
        filt = raw[start]
        line = bytearray(raw[start + 1:start + 1 + stride])
        if filt == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif filt == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev, strict=True))
        elif filt == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 255
        elif filt == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 255
        colours.update(bytes(line[i:i + bpp]) for i in range(0, stride, bpp))
        prev = line
    return width, height, colours
