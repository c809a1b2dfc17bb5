"""Run the CLI in-process the way a user does: argv in, exit code and output out."""

from __future__ import annotations

import signal
import sys
import textwrap
from pathlib import Path

from mergeplan.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    old = sys.argv
    sys.argv = ["mergeplan", *map(str, args)]
    # main() leaves signals ignored after an apply landed (the process is about to exit);
    # this process goes on, so it gets its own handlers back.
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
        for s, h in handlers.items():
            signal.signal(s, h)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Bad input: non-zero exit, exactly one 'error:' line, no traceback, and the line names the problem."""
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in errors[0], errors[0]


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path



def family_recipe(path: Path, method: str, base: Path | None, models: dict[Path, str], extra: str = "") -> Path:
    """A recipe over model directories: `models` maps each path to its inline parameters
    ("weight: 1.0, density: 0.5"); `extra` adds top-level YAML lines as written."""
    lines = [f"merge_method: {method}"]
    if base is not None:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for model, params in models.items():
        lines += [f"  - model: {model}", f"    parameters: {{{params}}}"]
    path.write_text("\n".join(lines) + "\n" + textwrap.dedent(extra).strip() + "\n")
    return path
