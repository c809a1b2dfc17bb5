"""Fine-tunes that added tokens: `tokenizer_source: base` and `union` (mergeplan/vocab.py)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import arch_models as am
from arch_models import one_torch_thread  # noqa: F401  (autouse fixture)
from cli_helpers import assert_one_line_error, run_cli, write_recipe
from mergeplan.plan import read_plan
from test_apply import load_all

ADDED = [f"<tool_{i}>" for i in range(8)]


@pytest.fixture(scope="module", params=["llama", "gpt2"])  # untied head, and a head tied to wte
def fam(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"vocab_{request.param}")
    f = am.build(request.param, root)
    f.chat = am.add_tokens(f.finetunes["math"], root / "chat", ADDED, seed=7)
    f.chat2 = am.add_tokens(f.finetunes["code"], root / "chat2", ADDED, seed=8)  # same tokens, other rows
    return f


def _rows(fam):
    """The tensors that hold token rows, as stored."""
    return [n for n in load_all(fam.base) if n.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight"))]


def _recipe(path, fam, method, models, source, extra=""):
    lines = [f"merge_method: {method}", f"base_model: {fam.base}", "models:"]
    lines += [f"  - model: {m}\n    parameters: {{weight: {w}}}" for m, w in models]
    if source:
        lines.append(f"tokenizer_source: {source}")
    return write_recipe(path, "\n".join(lines) + "\n" + extra)


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _plan_apply(capsys, tmp_path, recipe, tag):
    code, _, err = run_cli(capsys, "plan", recipe, "-o", tmp_path / f"{tag}.plan", "-q")
    assert code == 0, err
    code, _, err = run_cli(capsys, "apply", tmp_path / f"{tag}.plan", tmp_path / tag, "-q")
    assert code == 0, err
    return tmp_path / tag


def _truncated(src, dst, rows):
    """An independent stand-in for `base` mode: the same model with its rows cut by hand."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            sd = load_file(str(f))
            save_file({k: (v[:rows].contiguous() if v.shape[0] > rows and k in sd and v.dim() == 2
                           and k.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight")) else v)
                       for k, v in sd.items()}, str(dst / f.name), metadata={"format": "pt"})
        elif f.name == "config.json":
            cfg = json.loads(f.read_text())
            cfg["vocab_size"] = rows
            (dst / f.name).write_text(json.dumps(cfg))
    return dst


def _loads(out, vocab):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == vocab == model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, vocab - 1]])).logits
    assert logits.shape[-1] == vocab and bool(torch.isfinite(logits).all())


def test_base_keeps_the_base_vocabulary(fam, tmp_path, capsys):
    out = _plan_apply(capsys, tmp_path, _recipe(tmp_path / "b.yaml", fam, "ties",
                                                [(fam.chat, 1.0), (fam.finetunes["code"], 1.0)], "base",
                                                "parameters: {density: 0.5}\n"), "base")
    # the same merge with the added rows cut off by hand, through the path without vocab logic
    cut = _truncated(fam.chat, tmp_path / "cut", am.VOCAB)
    ref = _plan_apply(capsys, tmp_path, _recipe(tmp_path / "r.yaml", fam, "ties",
                                                [(cut, 1.0), (fam.finetunes["code"], 1.0)], None,
                                                "parameters: {density: 0.5}\n"), "ref")
    for f in sorted(p.name for p in ref.glob("*.safetensors")):
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f
    for f in ("tokenizer.json", "config.json"):
        assert _sha(out / f) == _sha(fam.base / f)
    _loads(out, am.VOCAB)
    plan = read_plan(tmp_path / "base.plan")
    assert any("tokenizer_source base" in n for n in plan.notes)


def test_union_keeps_every_added_token(fam, tmp_path, capsys):
    w = {"chat": 0.7, "code": 0.5}
    out = _plan_apply(capsys, tmp_path, _recipe(tmp_path / "u.yaml", fam, "task_arithmetic",
                                                [(fam.chat, w["chat"]), (fam.finetunes["code"], w["code"])],
                                                "union"), "union")
    n = am.VOCAB + len(ADDED)
    for f in ("tokenizer.json", "config.json"):
        assert _sha(out / f) == _sha(fam.chat / f)  # the files of the model holding the union
    _loads(out, n)
    got, base, chat, code = (load_all(p) for p in (out, fam.base, fam.chat, fam.finetunes["code"]))
    for name in _rows(fam):
        assert got[name].shape[0] == n
        b = base[name].astype(np.float64)
        want = b + w["chat"] * (chat[name][: am.VOCAB] - b) + w["code"] * (code[name] - b)
        np.testing.assert_allclose(got[name][: am.VOCAB], want, rtol=0, atol=2e-6)
        # only chat has the added tokens: every model (base included) is given chat's rows,
        # so no model moves them and the output has them exactly
        np.testing.assert_array_equal(got[name][am.VOCAB:], chat[name][am.VOCAB:])
    assert read_plan(tmp_path / "union.plan").aux_model == "chat"


def test_union_merges_tokens_several_models_added_around_their_mean(fam, tmp_path, capsys):
    w = {"chat": 0.7, "chat2": 0.4}
    out = _plan_apply(capsys, tmp_path, _recipe(tmp_path / "u2.yaml", fam, "task_arithmetic",
                                                [(fam.chat, w["chat"]), (fam.chat2, w["chat2"])], "union"), "u2")
    got, a, b = (load_all(p) for p in (out, fam.chat, fam.chat2))
    for name in _rows(fam):
        ra, rb = a[name][am.VOCAB:].astype(np.float64), b[name][am.VOCAB:].astype(np.float64)
        mean = (ra + rb) / 2  # the base lacks the rows: mergekit's default is the models' mean
        want = mean + w["chat"] * (ra - mean) + w["chat2"] * (rb - mean)
        np.testing.assert_allclose(got[name][am.VOCAB:], want, rtol=0, atol=2e-6)


def test_grown_vocabulary_without_tokenizer_source_is_one_line(fam, tmp_path, capsys):
    r = _recipe(tmp_path / "n.yaml", fam, "ties", [(fam.chat, 1.0), (fam.finetunes["code"], 1.0)], None,
                "parameters: {density: 0.5}\n")
    code, _, err = run_cli(capsys, "plan", r, "-o", tmp_path / "n.plan", "-q")
    assert_one_line_error(code, err, "tokenizer_source: base", "tokenizer_source: union", "rows")
    assert not (tmp_path / "n.plan").exists()


def test_union_of_conflicting_additions_is_one_line(fam, tmp_path, capsys):
    other = am.add_tokens(fam.finetunes["code"], tmp_path / "other", [f"<img_{i}>" for i in range(8)])
    r = _recipe(tmp_path / "c.yaml", fam, "task_arithmetic", [(fam.chat, 1.0), (other, 1.0)], "union")
    code, _, err = run_cli(capsys, "plan", r, "-o", tmp_path / "c.plan", "-q")
    assert_one_line_error(code, err, "<img_0>", "same ids", "tokenizer_source: base")
    # the same models under `base`: the added rows are dropped, nothing conflicts
    r = _recipe(tmp_path / "c2.yaml", fam, "task_arithmetic", [(fam.chat, 1.0), (other, 1.0)], "base")
    _plan_apply(capsys, tmp_path, r, "c2")


def test_guides_calibrate_a_fine_tune_that_added_tokens(fam, tmp_path, capsys):
    r = _recipe(tmp_path / "g.yaml", fam, "ties", [(fam.chat, 1.0), (fam.finetunes["code"], 1.0)], "union",
                f"parameters: {{density: 0.5}}\ncalibration: {{data: {fam.data}, samples: 4, seq_len: 12}}\n"
                "guides: {lewis: {gamma: 0.3}, aim: {omega: 0.4}, sens: {temperature: 2.0}}\n")
    out = _plan_apply(capsys, tmp_path, r, "g")
    _loads(out, am.VOCAB + len(ADDED))
    plan = read_plan(tmp_path / "g.plan")
    assert plan.stats["sens"]["g"].shape == (2, 2) and np.isfinite(plan.stats["sens"]["g"]).all()


def test_apply_checks_the_dropped_rows_too(fam, tmp_path, capsys):
    """`base` mode never merges chat's added rows, but they are part of the input it was
    planned from: a changed row there is a changed input."""
    chat = am.copy_model(fam.chat, tmp_path / "chat")
    r = _recipe(tmp_path / "t.yaml", fam, "task_arithmetic", [(chat, 1.0), (fam.finetunes["code"], 1.0)], "base")
    code, _, err = run_cli(capsys, "plan", r, "-o", tmp_path / "t.plan", "-q")
    assert code == 0, err
    f = next(chat.glob("*.safetensors"))
    sd = load_file(str(f))
    name = _rows(fam)[0]
    sd[name][-1, 0] += 1.0
    save_file(sd, str(f), metadata={"format": "pt"})
    code, _, err = run_cli(capsys, "apply", tmp_path / "t.plan", tmp_path / "t", "-q")
    assert_one_line_error(code, err, "chat")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della", "cabs"])
def test_union_under_every_sparsifying_method(fam, tmp_path, capsys, method):
    """Whatever the masks, a token one fine-tune added has no delta in any model (each was
    given that fine-tune's row), so the output holds the fine-tune's row exactly."""
    params = {"cabs": "parameters: {n: 4, m: 8}\n", "della": "parameters: {density: 0.5, epsilon: 0.1}\n",
              "breadcrumbs_ties": "parameters: {density: 0.6, gamma: 0.05}\n"}.get(method, "parameters: {density: 0.5}\n")
    out = _plan_apply(capsys, tmp_path, _recipe(tmp_path / "m.yaml", fam, method,
                                                [(fam.chat, 1.0), (fam.finetunes["code"], 1.0)], "union", params), "m")
    got, chat = load_all(out), load_all(fam.chat)
    for name in _rows(fam):
        np.testing.assert_array_equal(got[name][am.VOCAB:], chat[name][am.VOCAB:])
    _loads(out, am.VOCAB + len(ADDED))


@pytest.mark.parametrize("source", ["base", "union"])
def test_rows_read_slice_by_slice_from_the_shards_match(fam, tmp_path, capsys, monkeypatch, source):
    """Tensors too large to hold whole are read slice by slice from the shards; a grown
    vocabulary's rows come out the same as through the in-memory reader."""
    from mergeplan import slices

    r = _recipe(tmp_path / "s.yaml", fam, "ties", [(fam.chat, 1.0), (fam.chat2, 0.5)], source,
                "parameters: {density: 0.5}\n")
    mem = _plan_apply(capsys, tmp_path, r, "mem")
    monkeypatch.setattr(slices, "IN_MEMORY_INPUTS", 0)
    monkeypatch.setattr("mergeplan.apply.CHUNK", 40)  # slices that straddle the added rows
    monkeypatch.setattr("mergeplan.planner._PLAN_CHUNK", 40)
    files = _plan_apply(capsys, tmp_path, r, "files")
    assert read_plan(tmp_path / "mem.plan").tensors == read_plan(tmp_path / "files.plan").tensors
    for f in sorted(p.name for p in mem.glob("*.safetensors")):
        assert (mem / f).read_bytes() == (files / f).read_bytes(), f


@pytest.mark.parametrize("mutate", ["rows", "source", "model", "aux_model"])
def test_forged_vocabulary_records_are_refused(fam, tmp_path, capsys, mutate):
    from mergeplan.plan import write_plan

    r = _recipe(tmp_path / "f.yaml", fam, "task_arithmetic", [(fam.chat, 1.0), (fam.finetunes["code"], 1.0)], "union")
    code, _, err = run_cli(capsys, "plan", r, "-o", tmp_path / "f.plan", "-q")
    assert code == 0, err
    plan = read_plan(tmp_path / "f.plan")
    t = plan.tensor(_rows(fam)[0])
    if mutate == "rows":  # claims the base stores as many rows as chat: its shape says otherwise
        t.params["vocab"]["rows"]["base"] = t.shape[0]
    elif mutate == "source":
        t.params["vocab"]["source"] = "everything"
    elif mutate == "model":
        t.params["vocab"]["rows"]["stranger"] = 3
    else:
        plan.aux_model = "stranger"
    write_plan(plan, tmp_path / "f.plan")
    code, _, err = run_cli(capsys, "apply", tmp_path / "f.plan", tmp_path / "out", "-q")
    needles = {"rows": ["model base", "the plan says"], "aux_model": ["aux_model"]}.get(mutate, ["params.vocab"])
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists()


def test_grown_rows_in_only_some_models_leave_the_missing_tensor_to_the_table_check():
    """A model without a tensor the others grew is not a vocabulary question: the planner's
    tensor-table check names what is missing (before, plan_rows raised KeyError)."""
    from mergeplan.vocab import grown_tensors

    shapes = {"base": {"model.embed_tokens.weight": (8, 4), "lm_head.weight": (8, 4)},
              "chat": {"model.embed_tokens.weight": (16, 4)},
              "code": {"model.embed_tokens.weight": (16, 4), "lm_head.weight": (16, 4)}}
    assert grown_tensors(["model.embed_tokens.weight", "lm_head.weight"], shapes) == ["model.embed_tokens.weight"]


def test_a_config_that_is_not_a_mapping_is_no_config(tmp_path):
    from mergeplan.calibrate.models import base_vocab_size, check_vocabulary

    (tmp_path / "config.json").write_text("[1, 2]")
    assert base_vocab_size(tmp_path) is None
    (tmp_path / "config.json").write_text('{"vocab_size": "many"}')
    check_vocabulary("m", tmp_path, 8, {})  # a non-integer size is not compared (transformers refuses it)
