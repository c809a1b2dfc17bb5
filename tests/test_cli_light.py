"""Reading a plan never imports torch or transformers: `show`, `validate` and `diff` start
in a fraction of the 1-5 s that importing torch takes over SSH on a busy box."""

from __future__ import annotations

import subprocess
import sys

from mergeplan.plan.codec import write_plan
from plan_factory import make_full_plan

PROBE = """
import sys
sys.argv = ["mergeplan", *sys.argv[1:]]
from mergeplan.cli import main
try:
    main()
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "transformers", "safetensors.torch") if m in sys.modules)
sys.stderr.write("HEAVY=" + ",".join(heavy) + "\\n")
"""


def test_show_validate_diff_do_not_import_torch(tmp_path):
    a, b = tmp_path / "a.plan", tmp_path / "b.plan"
    write_plan(make_full_plan(), a)
    p = make_full_plan()
    next(t for t in p.tensors if t.contributions).contributions[0].weight = 0.25
    write_plan(p, b)
    for args in (["show", a], ["show", a, "--json"], ["show", a, "--tensors"], ["validate", a], ["diff", a, b]):
        r = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, timeout=120)
        assert "Traceback" not in r.stderr, r.stderr
        assert "HEAVY=\n" in r.stderr, (args, r.stderr[-500:])


def test_dtype_names_agree_with_the_torch_table():
    from mergeplan.io.tensors import _RECIPE_TO_TORCH
    from mergeplan.methods.spec import FLOAT_DTYPE_NAMES

    assert set(FLOAT_DTYPE_NAMES) == set(_RECIPE_TO_TORCH)
