"""check_plan: every inconsistency a plan can carry past the reader, listed, never raised."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mergeplan.plan import Contribution, decode_plan, encode_plan
from mergeplan.validate import check_plan
from plan_factory import make_full_plan

Q = 1  # tensors[1]: q_proj of layer 0, magnitude masks and AIM
K = 2  # tensors[2]: k_proj of layer 0, n:m masks with a CABS order


def test_the_factory_plan_is_clean():
    assert check_plan(make_full_plan()) == []


def _edit_q_mask0(p, **kv):
    p.tensors[Q].contributions[0].mask.update(kv)


@pytest.mark.parametrize("edit, needle", [
    (lambda p: setattr(p.models[2], "id", "math"), "duplicate model ids: math"),
    (lambda p: setattr(p, "method", "[/bold]magic"), "unknown method '[/bold]magic'"),
    (lambda p: setattr(p.models[1], "role", "judge"), "unknown role 'judge'"),
    (lambda p: setattr(p, "out_dtype", "int4"), "output dtype 'int4'"),
    (lambda p: setattr(p.tensors[Q], "op", "blend"), "unknown operation 'blend'"),
    (lambda p: setattr(p.tensors[0], "source", "ghost"), "copies from unknown model 'ghost'"),
    (lambda p: setattr(p.tensors[Q], "dtype", "int8"), "output dtype 'int8'"),
    (lambda p: setattr(p.tensors[Q].contributions[0], "model", "ghost"), "contribution from unknown model 'ghost'"),
    (lambda p: setattr(p.tensors[Q].contributions[1], "model", "math"), "[math]: contributes twice"),
    (lambda p: setattr(p.tensors[Q].contributions[0], "weight", math.nan), "weight nan is not finite"),
    (lambda p: setattr(p.tensors[Q].contributions[0], "weight", -math.inf), "weight -inf is not finite"),
    (lambda p: p.tensors[Q].params.update({"lambda": math.inf}), "lambda inf is not finite"),
    (lambda p: _edit_q_mask0(p, density=0.0), "density 0 outside (0, 1]"),
    (lambda p: _edit_q_mask0(p, density=1.5), "density 1.5 outside (0, 1]"),
    (lambda p: _edit_q_mask0(p, density=math.nan), "density nan outside (0, 1]"),
    (lambda p: _edit_q_mask0(p, rescale="double"), "rescale 'double'"),
    (lambda p: _edit_q_mask0(p, bits=b"\0" * 3), "explicit mask has 3 bytes, expected 512"),
    (lambda p: p.tensors[K].contributions[0].mask.update(m=0), "n:m = 2:0"),
    (lambda p: p.tensors[K].params.update(cabs_order=[0, 0]), "cabs_order [0, 0] is not an order of its 2"),
    (lambda p: setattr(p, "method", "linear"), "method linear does not sparsify, but the plan has a mask"),
    (lambda p: (setattr(p.tensors[Q], "shape", (64, 0)), p.tensors[Q].relax.update(scores=np.ones(0, np.float32))),
     "AIM relaxes along axis 1, which has no entries"),
    (lambda p: p.tensors[Q].relax.update(omega=math.nan), "AIM omega nan outside [0, 1]"),
    (lambda p: p.tensors[Q].relax.update(omega=2), "AIM omega 2 outside [0, 1]"),
    (lambda p: p.tensors[Q].relax.update(axis=5), "AIM axis 5 does not exist in a 2-d tensor"),
    (lambda p: p.tensors[Q].relax.update(scores=np.ones(3, np.float32)), "AIM scores have 3 entries"),
    (lambda p: p.tensors[Q].relax["scores"].__setitem__(0, np.nan), "AIM scores hold NaN or infinite values"),
    (lambda p: p.tensors.append(p.tensors[Q]), "listed twice"),
])
def test_each_problem_is_listed(edit, needle):
    p = make_full_plan()
    edit(p)
    # Through the file format, as `validate` meets it: the reader accepts all of these.
    problems = check_plan(decode_plan(encode_plan(p)))
    assert any(needle in pr for pr in problems), problems


def test_every_problem_is_listed_not_just_the_first():
    p = make_full_plan()
    t = p.tensors[Q]
    t.contributions = [Contribution(f"ghost{i}", math.nan) for i in range(3000)]
    problems = check_plan(decode_plan(encode_plan(p)))
    assert sum("unknown model" in pr for pr in problems) == 3000
    assert sum("not finite" in pr for pr in problems) == 3000


def test_vocabulary_records_are_checked_without_inputs():
    """`validate` (no inputs, no torch) already refuses a forged params.vocab and a
    vocabulary rule on a copied tensor (plan/rows.py)."""
    p = make_full_plan()
    t = next(t for t in p.tensors if t.op == "merge")
    models = p.input_models(t)
    t.params["vocab"] = {"source": "union", "rows": {m: t.shape[0] for m in models}}
    assert check_plan(p) == []
    t.params["vocab"] = {"source": "union", "rows": {m: t.shape[0] + 1 for m in models}}  # none stores the output's rows
    assert any("params.vocab" in x for x in check_plan(p))
    t.params["vocab"] = {"source": "base", "rows": {models[0]: True}}
    assert any("params.vocab" in x for x in check_plan(p))
    t.params.pop("vocab")
    copy = next((x for x in p.tensors if x.op == "copy"), None)
    if copy is not None:
        copy.params["vocab"] = {"source": "base", "rows": {}}
        assert any("copied tensor has a vocabulary rule" in x for x in check_plan(p))
