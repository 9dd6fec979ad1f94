"""Text made from a file's contents, made safe to show: no control characters reach a terminal or a page.

A clip's metadata, a LoRA's header or a model source are written by whoever made the file. Printed raw, an
ANSI/OSC escape in a prompt can clear the screen, set the window title or overwrite the line above it, and a
carriage return can hide what came before. `shown()` escapes every control character (C0, DEL, C1) and the
bidirectional overrides (which reorder what a reader sees) as `\\xNN` / `\\uNNNN`, so the text stays readable
and nothing in it acts. Torch-free, imported from every layer.
"""

from __future__ import annotations

import unicodedata

# Bidirectional embeddings, overrides and isolates: invisible, they reorder the text around them.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(value: object, *, newlines: bool = False) -> str:
    """`value` as text with every control character escaped; `newlines=True` keeps line feeds (multi-line text)."""
    text = value if isinstance(value, str) else str(value)
    out = []
    for ch in text:
        if ch == "\n" and newlines:
            out.append(ch)
        elif ch in _BIDI or unicodedata.category(ch) == "Cc":
            out.append(_escape(ch))
        else:
            out.append(ch)
    return "".join(out)
