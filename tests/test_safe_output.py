"""Plan strings reach the terminal literally: no Rich markup, no control characters.

Also: diff stays linear in the size of a plan (a crafted 1 MB plan once took 34 s).
"""

from __future__ import annotations

import io

from rich.console import Console

from cli_helpers import assert_one_line_error, run_cli
from mergeplan.plan import Contribution, ModelRef, Plan, TensorPlan, diff_plans, write_plan
from mergeplan.report import TABLE_CELLS, print_diff, print_plan
from mergeplan.safetext import clean, markup, text
from plan_factory import make_full_plan
from plan_mutate import CONTROL

MARKUP = "[/bold][ft0]:fire:"  # an unmatched closing tag raised; [ft0] vanished; :fire: became a glyph


def hostile_plan() -> Plan:
    p = make_full_plan()
    p.models[1].id = "math" + MARKUP
    p.models[1].path = "./math[red]"
    for t in p.tensors:
        for c in t.contributions:
            if c.model == "math":
                c.model = p.models[1].id
    p.tensors[3].name = "model.layers.0.self_attn.v_proj[ft0].weight"
    p.notes = ["note with \x1b]0;pwned\x07 title and \x1b[2J clear and \x9b31m C1 CSI"]
    p.created = "2026[/]"
    return p


def test_clean_and_markup():
    assert clean("a\x1b[2Jb\x9bc\x7f\td\ne") == "a\\x1b[2Jb\\x9bc\\x7f\\x09d\\x0ae"
    assert clean("a\nb\tc", keep_newlines=True) == "a\nb\\x09c"
    buf = io.StringIO()
    Console(file=buf, highlight=False).print("id " + markup(MARKUP + "\x1b"), emoji=False)
    assert buf.getvalue() == "id " + MARKUP + "\\x1b\n"
    assert text("x\x00", "bold").plain == "x\\x00"


def test_show_prints_plan_strings_literally(tmp_path, capsys):
    path = tmp_path / "p.plan"
    write_plan(hostile_plan(), path)
    code, out, err = run_cli(capsys, "show", "--tensors", path)
    assert code == 0, err
    assert "math" + MARKUP in out and "./math[red]" in out and "v_proj[ft0]" in out and "2026[/]" in out
    assert "\\x1b]0;pwned\\x07" in out and "\\x9b31m" in out
    assert not CONTROL.search(out + err)


def test_validate_and_the_error_handler_escape(tmp_path, capsys):
    p = hostile_plan()
    p.tensors[1].contributions[0].model = "ghost" + MARKUP
    path = tmp_path / "p.plan"
    write_plan(p, path)
    code, out, err = run_cli(capsys, "validate", path)
    assert code == 1 and "contribution from unknown model 'ghost" + MARKUP + "'" in err
    # A path with markup and an ESC: the one-line error names it literally.
    weird = tmp_path / ("x" + MARKUP + "\x1b[2J.plan")
    code, out, err = run_cli(capsys, "show", weird)
    assert_one_line_error(code, err, "x" + MARKUP + "\\x1b[2J.plan", "not found")
    assert not CONTROL.search(err)


def test_diff_prints_literally_and_long_diffs_as_plain_lines(tmp_path, capsys):
    a, b = tmp_path / "a.plan", tmp_path / "b.plan"
    write_plan(make_full_plan(), a)
    write_plan(hostile_plan(), b)
    code, out, err = run_cli(capsys, "diff", a, b)
    assert code == 1 and "math" + MARKUP in out and not CONTROL.search(out + err)
    # Thousands of changes: the summary stays a few lines, --tensors lists every one literally.
    n = TABLE_CELLS // 5 * 2
    pa, pb = _wide(n, 1.0), _wide(n, 2.0)
    pb.tensors[0].contributions[7].model = "m7" + MARKUP
    buf = io.StringIO()
    print_diff(Console(file=buf, width=100, highlight=False), diff_plans(pa, pb), "a", "b", tensors=True)
    lines = buf.getvalue().splitlines()
    assert lines[0] == f"a -> b: {n + 1} difference(s) in 1 tensor(s)"
    changes = lines[lines.index("every change") + 2:]  # after the tensor's name
    assert len(changes) == n + 1
    assert f"  m7{MARKUP}  contribution: - -> present" in changes and "  m7  contribution: present -> -" in changes


def test_show_with_more_rows_than_a_table_takes(capsys):
    p = _wide(3, 1.0)
    p.tensors = [TensorPlan(f"model.layers.{i}.mlp.w", (4, 4), "float32", contributions=[Contribution("m0", 1.0)])
                 for i in range(TABLE_CELLS // 6 + 5)]
    buf = io.StringIO()
    print_plan(Console(file=buf, width=100, highlight=False), p, "p.plan", tensors=True)
    out = buf.getvalue()
    assert f"model.layers.{len(p.tensors) - 1}.mlp.w" in out and out.count("float32") == len(p.tensors)


class CountingId(str):
    """A model id that counts how often it is compared."""

    compared = 0

    def __eq__(self, other):
        CountingId.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def _wide(n: int, weight: float) -> Plan:
    models = [ModelRef("base", "base", "b")] + [ModelRef(f"m{i}", "task", f"m{i}") for i in range(n)]
    contribs = [Contribution(CountingId(f"m{i}"), weight) for i in range(n)]
    return Plan("ties", models, [TensorPlan("w", (4, 4), "float32", contributions=contribs)])


def test_diff_compares_model_ids_a_linear_number_of_times():
    # The diff looked each contribution up by scanning the other plan's list: n^2 / 2
    # comparisons, 34 s for a crafted 1 MB plan. Timing-free: count the comparisons.
    n = 3000
    a, b = _wide(n, 1.0), _wide(n, 2.0)
    CountingId.compared = 0
    rows = diff_plans(a, b)
    assert len(rows) == n
    assert CountingId.compared < 4 * n
