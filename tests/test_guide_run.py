import tempfile
from pathlib import Path

import numpy as np
import pytest

from mergeplan.guides import GuideDecisions, ModelInput, run_guides
from test_calib_family import TASKS, family, one_thread  # noqa: F401

GUIDES = {"lewis": {"gamma": 0.4, "epsilon": 0.9}, "aim": {"omega": 0.5}, "sens": {"temperature": 2.0}}


def _cal(family, **kw):
    return {"data": {t: f"{t}.jsonl" for t in TASKS}, "samples": 3, "seq_len": 14, "batch_size": 2, **kw}


def _run(family, quiet=True, **kw):
    return run_guides(GUIDES, _cal(family, **kw), ModelInput("base", family.base),
                      [ModelInput(t, family.models[t]) for t in TASKS], family.root, quiet=quiet)


@pytest.fixture(scope="module")
def all_guides(family):
    return _run(family)


def _plain(obj, where="") -> None:
    """Only what the plan codec stores: str keys, numbers, strings, lists, float32/int32 arrays."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str), where
            _plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _plain(v, where)
    elif isinstance(obj, np.ndarray):
        assert obj.dtype in (np.float32, np.int32), (where, obj.dtype)
    else:
        assert obj is None or isinstance(obj, (bool, int, float, str)), (where, type(obj))


def test_all_guides_together_fill_every_part_of_the_decisions(all_guides):
    dec = all_guides
    assert isinstance(dec, GuideDecisions)
    assert len(dec.densities) == 14 and all(set(v) == set(TASKS) for v in dec.densities.values())
    assert "model.embed_tokens.weight" not in dec.densities and "lm_head.weight" not in dec.densities
    assert "model.embed_tokens.weight" in dec.weights and "model.embed_tokens.weight" not in dec.relax
    assert dec.relax["model.layers.0.mlp.up_proj.weight"]["omega"] == 0.5
    st = dec.tensor_stats["model.layers.1.self_attn.o_proj.weight"]
    assert {"lewis.score_base", "lewis.score", "lewis.delta", "aim.mean_factor", "sens.alpha", "sens.group"} <= set(st)
    assert set(dec.plan_stats) == {"lewis", "aim", "sens"}
    assert set(dec.guides) == {"lewis", "aim", "sens"} and dec.guides["aim"]["omega"] == 0.5
    for part in ("densities", "weights", "relax", "tensor_stats", "plan_stats", "guides", "calibration"):
        _plain(getattr(dec, part), part)


def test_calibration_record_holds_settings_digests_and_data_per_model(all_guides, family):
    cal = all_guides.calibration
    assert (cal["samples"], cal["seq_len"], cal["batch_size"], cal["device"]) == (3, 14, 2, "auto")
    assert cal["resolved_device"] in ("cpu", "cuda", "mps")
    assert cal["data"] == {t: f"{t}.jsonl" for t in sorted(TASKS)}  # as written, relative to the recipe
    assert cal["data_for"]["legal"] == "legal.jsonl"
    ds = cal["datasets"]["math.jsonl"]
    assert ds["samples"] == 3 and len(ds["text_sha256"]) == 64 and len(ds["tokens_sha256"]) == 64
    assert set(cal["timings_s"]) == {"base", *TASKS}
    assert any("padded and the padding is masked" in n for n in cal["notes"])


def test_same_inputs_give_the_same_decisions(all_guides, family):
    again = _run(family)
    assert again.densities == all_guides.densities and again.weights == all_guides.weights
    for t, spec in all_guides.relax.items():
        np.testing.assert_array_equal(spec["scores"], again.relax[t]["scores"])


def test_progress_goes_to_stderr_unless_quiet(family, capfd):
    run_guides({"aim": {}}, {"data": "math.jsonl", "samples": 2, "seq_len": 8}, ModelInput("base", family.base),
               [ModelInput("math", family.models["math"])], family.root, quiet=False)
    out, err = capfd.readouterr()
    assert out == "" and "base (base) · math.jsonl" in err
    run_guides({"aim": {}}, {"data": "math.jsonl", "samples": 2, "seq_len": 8}, ModelInput("base", family.base),
               [ModelInput("math", family.models["math"])], family.root, quiet=True)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_interrupt_leaves_no_hooks_and_no_temporary_logits(family, monkeypatch, tmp_path):
    import mergeplan.calibrate.run as run_mod

    # a private temp dir: other test workers' logit stores come and go in the shared one
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    calls = {"n": 0}
    real = run_mod.logits_pass

    def interrupted(model, *a, **k):
        calls["n"] += 1
        calls["model"] = model
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "logits_pass", interrupted)
    before = set(Path(tempfile.gettempdir()).glob("mergeplan-logits-*"))
    with pytest.raises(KeyboardInterrupt):
        _run(family)
    assert calls["n"] == 1 and real is not interrupted
    assert set(Path(tempfile.gettempdir()).glob("mergeplan-logits-*")) == before
    m = calls["model"]
    assert all(not mod._forward_pre_hooks for mod in m.modules())
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in m.parameters())
