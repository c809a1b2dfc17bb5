"""What a merged output says about itself: the model card README.md and mergeplan.json.

Every string here may come from a received plan (model ids, paths, recipe text, guide
records), so none of it is written raw: control characters are shown escaped, Markdown
table cells cannot open HTML or split the row, and the recipe sits in a code fence longer
than any backtick run inside it. mergeplan.json is JSON with ASCII escapes.
"""

from __future__ import annotations

import json
import re

from . import __version__
from .safetext import clean
from .plan.identity import decision_digest, edit_summary
from .plan.model import Plan

def _visible(s: object) -> str:
    """Control and layout characters (but newlines) shown escaped, so no line can be
    forged, hidden or reordered."""
    return clean(s, keep_newlines=True)


def _cell(s: object) -> str:
    """A Markdown table cell: one line, no HTML, no column break, no code span break."""
    t = _visible(s).replace("\n", "\\n").replace("\t", " ")
    for a, b in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "&#124;"), ("`", "&#96;"),
                 ("[", "&#91;"), ("]", "&#93;"), ("*", "&#42;")):
        t = t.replace(a, b)
    return t


def _fence(text: str) -> str:
    run = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, run + 1)


def _plain(v):
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items() if not hasattr(x, "shape")}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    return v


def provenance(plan: Plan, file_digest: str) -> dict:
    """The content of mergeplan.json (also the model card's facts)."""
    return {
        "mergeplan_version": __version__,
        "plan_digest": file_digest,
        "decision_digest": decision_digest(plan),
        "method": plan.method,
        "edits": edit_summary(plan),
        "models": [{"id": m.id, "role": m.role, "path": m.path, **({"hub": m.hub} if m.hub else {})}
                   for m in plan.models],
    }


def provenance_json(prov: dict) -> str:
    return json.dumps(prov, indent=2, sort_keys=True, ensure_ascii=True) + "\n"


def model_card(plan: Plan, prov: dict) -> str:
    ed = prov["edits"]
    edited = (f"yes: {ed['changes']} value(s) changed in {ed['sessions']} edit session(s) "
              f"({_cell(', '.join(ed['tools']))})") if ed["edited"] else "no"
    lines = [
        "---", "library_name: transformers", "tags: [merge, mergeplan]", "---", "",
        "# Merged model", "",
        f"Merged with [mergeplan](https://pypi.org/project/mergeplan/) {__version__} using "
        f"**{_cell(plan.method)}**.", "",
        f"- Decision digest: `{prov['decision_digest']}` (same inputs and decisions, same digest)",
        f"- Plan file digest: `{prov['plan_digest']}`",
        f"- Edited by hand after planning: {edited}", "",
        "## Inputs", "",
        "| model | role | path |", "|---|---|---|",
    ]
    for m in plan.models:
        where = m.path if not m.hub else f"{m.hub.get('repo')}@{m.hub.get('revision')}"
        lines.append(f"| {_cell(m.id)} | {_cell(m.role)} | {_cell(where)} |")
    if plan.guides:
        lines += ["", "## Guides", ""]
        for g, v in sorted(plan.guides.items(), key=lambda kv: str(kv[0])):
            lines.append(f"- {_cell(g)}: {_cell(json.dumps(_plain(v), sort_keys=True, default=str))}")
    text = _visible(plan.recipe.get("text", "") if isinstance(plan.recipe, dict) else "").rstrip()
    fence = _fence(text)
    lines += ["", "## Recipe", "", fence + "yaml", text, fence, ""]
    return "\n".join(lines)
