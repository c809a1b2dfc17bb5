"""mergeplan eval: in-memory merges equal apply's output bit for bit, scores equal an
independent computation, and the CLI reports losses, experts and recovered gains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cli_helpers import assert_one_line_error, family_recipe, run_cli
from mergeplan.apply import ApplyOptions, apply_plan
from mergeplan.evaluate import load_eval_sets, load_merged, merge_in_memory, score_model
from mergeplan.evaluate.run import load_model_dir
from mergeplan.planner import PlanOptions, build_plan
from mergeplan.plan.codec import write_plan
from mergeplan.recipe import load_recipe
from test_calib_family import one_thread  # noqa: F401  (tiny models: one torch thread)


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _plan(fam, tmp: Path, method: str, params: str, extra: str = ""):
    models = {fam.finetunes[m]: params for m in ("math", "code", "legal")}
    r = family_recipe(tmp / f"{method}.yaml", method, fam.base, models, extra)
    plan = build_plan(load_recipe(r), PlanOptions(threads=1, quiet=True))
    path = tmp / f"{method}.plan"
    write_plan(plan, path)
    return plan, path


@pytest.mark.parametrize("method,params,extra,bf16", [
    ("ties", "weight: 0.5, density: 0.5", "", False),  # streamed, magnitude top-k
    ("dare_ties", "weight: 0.5, density: 0.5", "parameters: {rescale_mode: l1}", True),  # whole tensors, bf16
    ("cabs", "weight: 0.5, n: 8", "parameters: {m: 16}", False),  # streamed n:m groups, masks depend on each other
])
def test_in_memory_merge_equals_apply_output_bit_for_bit(tiny_family, tiny_family_bf16, tmp_path, method, params,
                                                         extra, bf16):
    fam = tiny_family_bf16 if bf16 else tiny_family
    plan, _ = _plan(fam, tmp_path, method, params, extra)
    apply_plan(plan, tmp_path / "out", ApplyOptions(threads=2))
    want = _tensors(tmp_path / "out")
    got = merge_in_memory(plan, threads=2)
    assert list(got) == [t.name for t in plan.tensors] and set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(_bits(got[name]), _bits(t)), name


def test_streamed_and_whole_paths_are_both_exercised(tiny_family, tmp_path):
    from mergeplan.streamed import streamable

    ties, _ = _plan(tiny_family, tmp_path, "ties", "weight: 0.5, density: 0.5")
    l1, _ = _plan(tiny_family, tmp_path, "dare_ties", "weight: 0.5, density: 0.5", "parameters: {rescale_mode: l1}")
    assert all(streamable(ties, t) for t in ties.tensors if t.op == "merge")
    assert not any(streamable(l1, t) for t in l1.tensors if t.op == "merge")


def test_loaded_merge_computes_what_the_applied_directory_computes(tiny_family, tmp_path):
    plan, _ = _plan(tiny_family, tmp_path, "ties", "weight: 0.5, density: 0.5")
    apply_plan(plan, tmp_path / "out", ApplyOptions())
    mem = load_merged(plan, merge_in_memory(plan))
    disk = load_model_dir(tmp_path / "out", torch.device("cpu"))
    ids = torch.tensor([[1, 5, 9, 40, 7, 3, 22, 11]])
    with torch.no_grad():
        assert torch.equal(mem(input_ids=ids).logits, disk(input_ids=ids).logits)
    assert not mem.training


def test_scores_match_an_independent_per_sample_computation(tiny_family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_family.base)
    sets = load_eval_sets({"code": str(tiny_family.data["code"])}, tok, samples=5, seq_len=40)
    model = load_model_dir(tiny_family.finetunes["code"], torch.device("cpu"))
    got = score_model(model, sets, batch_size=3)["code"]  # batches of 3 pad the shorter samples
    m64 = model.double()
    for i, ids in enumerate(sets["code"].samples):
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = m64(input_ids=x).logits[0, :-1]
        target = x[0, 1:]
        ce = torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        assert got.tokens[i] == len(ids) - 1
        assert got.loss_sum[i] == pytest.approx(ce, rel=1e-5)
        assert got.correct[i] == int((logits.argmax(-1) == target).sum())
    assert got.loss == pytest.approx(got.loss_sum.sum() / got.tokens.sum())


def test_skip_passes_over_the_records_calibration_read(tiny_family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_family.base)
    src = {"math": str(tiny_family.data["math"])}
    first = load_eval_sets(src, tok, samples=6, seq_len=32)["math"].samples
    later = load_eval_sets(src, tok, samples=3, seq_len=32, skip=3)["math"].samples
    assert later == first[3:6]


def _data_arg(fam) -> str:
    return ",".join(f"{t}={fam.data[t]}" for t in ("general", "math", "code", "legal"))


def test_eval_cli_reports_losses_experts_and_gains(tiny_family, tmp_path, capsys):
    plan, plan_path = _plan(tiny_family, tmp_path, "ties", "weight: 0.5, density: 0.5")
    apply_plan(plan, tmp_path / "applied", ApplyOptions())
    code, out, err = run_cli(capsys, "eval", plan_path, tmp_path / "applied", "--data", _data_arg(tiny_family),
                             "--samples", "4", "--seq-len", "32", "--threads", "1", "--bootstrap", "200", "--json")
    assert code == 0, err
    assert err == ""  # --json: no progress
    rep = json.loads(out)
    names = [m["name"] for m in rep["models"]]
    assert names == ["base", "math", "code", "legal", "ties", "applied"]
    assert {t: v["expert"] for t, v in rep["tasks"].items()} == {"general": None, "math": "math", "code": "code",
                                                                  "legal": "legal"}
    by = {m["name"]: m for m in rep["models"]}
    # the plan merged in memory scores exactly what apply's directory scores
    assert by["ties"]["tasks"] == by["applied"]["tasks"] and by["ties"]["merged_in_memory"]
    for t in ("math", "code", "legal"):
        base, merged, expert = (by[n]["tasks"][t]["loss"] for n in ("base", "ties", t))
        want = (base - merged) / (base - expert) if base > expert else None
        got = by["ties"]["tasks"][t].get("gain")
        assert (got is None and want is None) or got == pytest.approx(want, rel=1e-12)
        assert "gain" not in by["ties"]["tasks"]["general"]
    gains = [by["ties"]["tasks"][t]["gain"] for t in ("math", "code", "legal") if by["ties"]["tasks"][t]["gain"]]
    assert by["ties"]["mean_gain"] == pytest.approx(sum(gains) / len(gains))
    ci = by["ties"]["mean_gain_ci"]
    assert ci["low"] <= ci["estimate"] <= ci["high"]
    assert rep["comparison"]["within_noise"] is True  # the same merge twice: difference 0
    assert rep["settings"]["samples"] == 4 and rep["tasks"]["math"]["samples"] == 4


def test_eval_cli_table_and_progress(tiny_family, tmp_path, capsys):
    _, plan_path = _plan(tiny_family, tmp_path, "task_arithmetic", "weight: 0.3")
    code, out, err = run_cli(capsys, "eval", plan_path, "--data", f"math={tiny_family.data['math']}",
                             "--data", f"code={tiny_family.data['code']}", "--samples", "2", "--seq-len", "16",
                             "--threads", "1", "--bootstrap", "50")
    assert code == 0, err
    assert "held-out loss" in out and "recovered gain" in out and "task_arithmetic" in out
    assert "task_arithmetic · merge in memory" in err and "base · score 2 task(s)" in err


def test_expert_found_through_the_plans_calibration_source(tiny_family, tmp_path, capsys):
    fam = tiny_family
    models = {fam.finetunes[m]: "weight: 0.5" for m in ("math", "code")}
    extra = f"""
        calibration:
          data: {{base: {fam.data['general']}, math: {fam.data['math']}, code: {fam.data['code']}}}
          samples: 2
          seq_len: 16
        guides: {{aim: {{omega: 0.5}}}}
    """
    r = family_recipe(tmp_path / "g.yaml", "task_arithmetic", fam.base, models, extra)
    plan = build_plan(load_recipe(r), PlanOptions(threads=1, quiet=True))
    write_plan(plan, tmp_path / "g.plan")
    code, out, err = run_cli(capsys, "eval", tmp_path / "g.plan", "--data", f"arith={fam.data['math']}",
                             "--data", f"legal={fam.data['legal']}", "--samples", "2", "--seq-len", "16",
                             "--threads", "1", "--bootstrap", "50", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["tasks"]["arith"]["expert"] == "math" and rep["tasks"]["legal"]["expert"] is None


def test_no_baselines_scores_only_the_merges(tiny_family, tmp_path, capsys):
    _, plan_path = _plan(tiny_family, tmp_path, "task_arithmetic", "weight: 0.3")
    code, out, err = run_cli(capsys, "eval", plan_path, "--data", f"math={tiny_family.data['math']}",
                             "--no-baselines", "--samples", "2", "--seq-len", "16", "--threads", "1", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert [m["name"] for m in rep["models"]] == ["task_arithmetic"] and rep["models"][0]["mean_gain"] is None


def test_eval_bad_input_is_one_line(tiny_family, tmp_path, capsys):
    _, plan_path = _plan(tiny_family, tmp_path, "task_arithmetic", "weight: 0.3")
    code, _, err = run_cli(capsys, "eval", plan_path, "--data", f"math={tmp_path / 'nope.jsonl'}")
    assert_one_line_error(code, err, "nope.jsonl", "--data")
    code, _, err = run_cli(capsys, "eval", tmp_path / "missing.plan", "--data", f"math={tiny_family.data['math']}")
    assert_one_line_error(code, err, "missing.plan")
    code, _, err = run_cli(capsys, "eval", plan_path, "--data", "math=")
    assert_one_line_error(code, err, "NAME=PATH")
    code, _, err = run_cli(capsys, "eval", plan_path, "--data", f"math={tiny_family.data['math']}", "--samples", "0")
    assert_one_line_error(code, err, "--samples")


def test_eval_checks_the_plans_inputs_as_apply_does(tiny_family, tmp_path, capsys):
    import shutil

    fam = tmp_path / "fam"
    shutil.copytree(tiny_family.root, fam)
    models = {fam / m: "weight: 0.5, density: 0.5" for m in ("math", "code")}
    r = family_recipe(tmp_path / "t.yaml", "ties", fam / "base", models)
    plan = build_plan(load_recipe(r), PlanOptions(threads=1, quiet=True))
    write_plan(plan, tmp_path / "t.plan")
    shard = sorted((fam / "code").glob("*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x01  # one flipped bit in the last tensor's data
    shard.write_bytes(bytes(raw))
    code, _, err = run_cli(capsys, "eval", tmp_path / "t.plan", "--data", f"math={tiny_family.data['math']}",
                           "--no-baselines", "--samples", "2", "--seq-len", "16", "--threads", "1")
    assert_one_line_error(code, err, "code")


def test_tied_embeddings_load_from_the_merged_tensors(family_builder, tmp_path):
    fam = family_builder.build_family(tmp_path / "tied", steps=0, seed=1, tied=True, hidden=32, layers=2)
    plan, _ = _plan(fam, tmp_path, "task_arithmetic", "weight: 0.4")
    assert "lm_head.weight" not in {t.name for t in plan.tensors}
    apply_plan(plan, tmp_path / "out", ApplyOptions())
    mem = load_merged(plan, merge_in_memory(plan))
    assert mem.get_output_embeddings().weight is mem.get_input_embeddings().weight
    disk = load_model_dir(tmp_path / "out", torch.device("cpu"))
    ids = torch.tensor([[1, 5, 9, 40, 7, 3]])
    with torch.no_grad():
        assert torch.equal(mem(input_ids=ids).logits, disk(input_ids=ids).logits)


def test_weights_that_do_not_fit_the_config_are_one_line_errors(family_builder, tiny_family, tmp_path):
    from mergeplan.errors import MergeplanError

    other = family_builder.build_family(tmp_path / "small", steps=0, seed=1, hidden=32, layers=2)
    plan, _ = _plan(tiny_family, tmp_path, "task_arithmetic", "weight: 0.4")
    with pytest.raises(MergeplanError, match="do not fit") as e:
        load_merged(plan, merge_in_memory(plan), model_dir=other.base)
    assert "\n" not in str(e.value)


def test_model_directories_with_baselines_named_on_the_command_line(tiny_family, tmp_path, capsys):
    fam = tiny_family
    plan, _ = _plan(fam, tmp_path, "task_arithmetic", "weight: 0.3")
    apply_plan(plan, tmp_path / "merged", ApplyOptions())
    code, out, err = run_cli(capsys, "eval", tmp_path / "merged", "--base", fam.base, "--model",
                             f"code={fam.finetunes['code']}", "--data", f"code={fam.data['code']},legal={fam.data['legal']}",
                             "--samples", "2", "--seq-len", "16", "--threads", "1", "--bootstrap", "50", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert [(m["name"], m["kind"]) for m in rep["models"]] == [("base", "base"), ("code", "fine-tune"),
                                                              ("merged", "merge")]
    assert rep["tasks"]["code"]["expert"] == "code" and rep["tasks"]["legal"]["expert"] is None


def test_a_plans_baselines_are_the_models_it_recorded(tiny_family, tmp_path, capsys):
    """A baseline's directory comes from the plan (a received one names any path): it must
    be the model the plan recorded before it is scored, as apply's inputs must (the
    in-memory merge checks every tensor's digest, and runs first). Here the math
    fine-tune's path leads to the code fine-tune, whose headers are the same."""
    models = {tiny_family.finetunes[m]: "weight: 0.5, density: 0.5" for m in ("math", "code")}
    r = family_recipe(tmp_path / "t.yaml", "ties", tiny_family.base, models)
    write_plan(build_plan(load_recipe(r), PlanOptions(threads=1, quiet=True)), tmp_path / "t.plan")
    code, _, err = run_cli(capsys, "eval", tmp_path / "t.plan", "--data", f"math={tiny_family.data['math']}",
                           "--model", f"math={tiny_family.finetunes['code']}",
                           "--samples", "2", "--seq-len", "16", "--threads", "1")
    assert_one_line_error(code, err, "math")
    assert "score" not in err  # refused before any model was scored
