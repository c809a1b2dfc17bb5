"""Text from plans and inputs, made safe to print.

A plan is shared like a lock file, so its strings (model ids, paths, tensor names, notes,
the recipe text) are someone else's. Printed as they are, an ESC or other control
character would drive the terminal (move the cursor, retitle the window, hide lines),
and a "[/bold]" would be read as Rich markup (an unmatched closing tag raises; a "[ft0]"
silently disappears). Every such string goes through one of these on its way out:

- `clean(s)`: C0 and C1 control characters and DEL shown as visible escapes (\\x1b);
  `keep_newlines=True` keeps line breaks where multi-line text is shown on purpose;
- `markup(s)`: clean, then Rich-escaped: for f-strings passed to console.print (with
  emoji=False, or Rich still turns a ":fire:" in the string into a glyph);
- `text(s, style)`: clean, as a rich Text, which Rich never parses for markup or emoji
  codes: for table cells and assembled lines.
"""

from __future__ import annotations

import re
from typing import Any

from rich.markup import escape
from rich.text import Text

# C0/C1 controls and DEL, plus the invisible characters that reorder or break lines
# (bidi marks, overrides and isolates, line and paragraph separators): each could disguise
# text (a model id could make "0.25 -> 0.5" read backwards: Trojan Source). The CLI and the
# review share this one set.
_LAYOUT = "\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[\x00-\x1f\x7f-\x9f{_LAYOUT}]")
_CONTROL_BUT_NEWLINE = re.compile(f"[\x00-\x09\x0b-\x1f\x7f-\x9f{_LAYOUT}]")


def _visible(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def clean(s: Any, keep_newlines: bool = False) -> str:
    """str(s) with control characters replaced by visible \\xNN escapes."""
    s = s if isinstance(s, str) else str(s)
    return (_CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL).sub(_visible, s)


def markup(s: Any) -> str:
    """clean(s), escaped so that Rich markup prints it literally."""
    return escape(clean(s))


def text(s: Any, style: str = "") -> Text:
    """clean(s) as a Text, which Rich renders literally (no markup, no emoji codes)."""
    return Text(clean(s), style=style)
