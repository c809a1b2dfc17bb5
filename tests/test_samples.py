"""The tiny sample family: loadable with transformers, sharded as promised, fine-tunes that
really differ, reproducible bytes, held-out data, and the trained path."""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mergeplan.errors import MergeplanError

SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
SAMPLE_TEXT = "Permission is granted to copy.\n    def f(x):\n        return x + 1  # 37+48=85"


def load64(model_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key).to(torch.float64).numpy()
    return out


def sha_tree(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def rms(arrays: list[np.ndarray]) -> float:
    return math.sqrt(sum(float((a**2).sum()) for a in arrays) / sum(a.size for a in arrays))


def test_every_model_loads_with_auto_classes(tiny_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    ids = None
    for name, directory in tiny_family.models.items():
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
        enc = tok(SAMPLE_TEXT)["input_ids"]
        assert enc[0] == tok.bos_token_id
        assert tok.decode(enc, skip_special_tokens=True) == SAMPLE_TEXT  # byte-level: lossless
        ids = enc if ids is None else ids
        assert enc == ids, f"{name}: every model ships the same tokenizer"

        model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True)
        assert isinstance(model, LlamaForCausalLM)
        cfg = model.config
        assert cfg.vocab_size == len(tok) and 1024 <= len(tok) <= 2048
        assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA: narrower k/v
        assert not cfg.tie_word_embeddings
        assert model.generation_config.eos_token_id == tok.eos_token_id
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([enc])).logits
        assert logits.shape == (1, len(enc), len(tok))
        assert torch.isfinite(logits).all()


def test_each_model_is_two_shards_with_a_matching_index(tiny_family):
    for name, directory in tiny_family.models.items():
        assert sorted(p.name for p in directory.glob("*.safetensors")) == SHARDS, name
        for extra in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (directory / extra).is_file(), f"{name}/{extra}"
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        held: dict[str, str] = {}
        size = 0
        for shard in SHARDS:
            with safe_open(str(directory / shard), framework="pt") as f:
                assert f.metadata() == {"format": "pt"}
                keys = list(f.keys())
                assert keys, f"{name}/{shard} is empty"
                for key in keys:
                    t = f.get_tensor(key)
                    held[key] = shard
                    size += t.numel() * t.element_size()
        assert index["weight_map"] == held
        assert index["metadata"]["total_size"] == size
        assert "lm_head.weight" in held and "model.embed_tokens.weight" in held


def test_finetunes_differ_from_base_and_each_other_in_their_own_way(tiny_family):
    base = load64(tiny_family.base)
    deltas = {n: {k: v - base[k] for k, v in load64(p).items()} for n, p in tiny_family.finetunes.items()}
    names = list(deltas)
    for i, a in enumerate(names):
        assert any(np.any(d != 0) for d in deltas[a].values()), a
        for b in names[i + 1 :]:
            assert any(not np.array_equal(deltas[a][k], deltas[b][k]) for k in base), (a, b)

    def part(name: str, pred) -> float:
        return rms([d for k, d in deltas[name].items() if pred(k)])

    attn = lambda k: ".self_attn." in k  # noqa: E731
    mlp = lambda k: ".mlp." in k  # noqa: E731
    norm = lambda k: k.endswith("norm.weight")  # noqa: E731
    # math moves attention most, code the MLP; only legal touches norms and embeddings.
    assert part("math", attn) > 4 * part("math", mlp)
    assert part("code", mlp) > 4 * part("code", attn)
    assert part("legal", norm) > 0 and part("math", norm) == 0 and part("code", norm) == 0
    assert np.any(deltas["legal"]["model.embed_tokens.weight"] != 0)
    assert not np.any(deltas["math"]["lm_head.weight"])
    # legal is sparse (~10% of entries) and grows with depth.
    q = sorted((k for k in base if k.endswith("self_attn.q_proj.weight")), key=lambda k: int(k.split(".")[2]))
    density = np.mean([np.mean(deltas["legal"][k] != 0) for k in q])
    assert 0.05 < density < 0.15
    assert rms([deltas["legal"][q[-1]]]) > 2 * rms([deltas["legal"][q[0]]])
    # The base is not a trivial init: norms are not all ones.
    assert not np.all(base["model.norm.weight"] == 1.0)


def test_same_seed_same_bytes_other_seed_other_weights(family_builder, tiny_family, tmp_path):
    again = family_builder.build_family(tmp_path / "again", steps=0, seed=0)
    other = family_builder.build_family(tmp_path / "other", steps=0, seed=1)
    for name in ("base", *family_builder.FAMILY_MODELS):
        first = sha_tree(tiny_family.model(name))
        assert sha_tree(again.model(name)) == first, name
        shuffled = sha_tree(other.model(name))
        for shard in SHARDS:
            assert shuffled[shard] != first[shard], (name, shard)
        assert shuffled["tokenizer.json"] == first["tokenizer.json"]  # tokenizer is seed-free
    assert sha_tree(again.root / "data") == sha_tree(tiny_family.root / "data") == sha_tree(other.root / "data")


def test_bf16_family_is_the_float32_family_rounded(tiny_family, tiny_family_bf16):
    assert json.loads((tiny_family_bf16.base / "config.json").read_text())["dtype"] == "bfloat16"
    for name in tiny_family.models:
        for shard in SHARDS:
            with safe_open(str(tiny_family_bf16.model(name) / shard), framework="pt") as f:
                assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        f32 = load64(tiny_family.model(name))
        b16 = load64(tiny_family_bf16.model(name))
        for key, value in f32.items():
            rounded = torch.from_numpy(value).to(torch.bfloat16).to(torch.float64).numpy()
            np.testing.assert_array_equal(b16[key], rounded, err_msg=f"{name} {key}")
    # Rounding to bf16 keeps the task vectors: most perturbed entries still move.
    base = load64(tiny_family_bf16.base)
    math_q = load64(tiny_family_bf16.finetunes["math"])["model.layers.0.self_attn.q_proj.weight"]
    assert np.mean(math_q != base["model.layers.0.self_attn.q_proj.weight"]) > 0.9


def test_data_files_are_held_out_and_well_formed(family_builder, tiny_family):
    data = tiny_family.data
    assert set(data) == {"general", "math", "code", "legal"}
    assert data == family_builder.data_paths(tiny_family.root)
    general = [p for p in data["general"].read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rows = {
        t: [json.loads(line) for line in data[t].read_text(encoding="utf-8").splitlines()]
        for t in ("math", "code", "legal")
    }
    assert len(general) >= 20 and all(len(r) >= 20 for r in rows.values())
    for r in rows["math"]:
        assert set(r) == {"prompt", "response"}
        a, b = r["prompt"].removesuffix("=").split("+")
        assert r["prompt"].endswith("=") and int(r["response"]) == int(a) + int(b)
    assert all(set(r) == {"text"} for t in ("code", "legal") for r in rows[t])
    assert all(r["text"] == r["text"].upper() for r in rows["legal"])

    corpus = family_builder.load_corpus()
    train = family_builder.training_texts(corpus)
    base_train = set(train["base"])
    legal_train = set(train["legal"])
    assert not base_train & set(g.strip() for g in general)
    assert not legal_train & {r["text"] for r in rows["legal"]}
    # Nor near copies (sibling licence versions repeat paragraphs with small edits).
    for para in [*corpus.heldout_general, *corpus.heldout_legal]:
        for other in base_train:
            if abs(len(other) - len(para)) < 0.2 * len(para):
                m = difflib.SequenceMatcher(None, para, other, autojunk=False)
                assert not (m.real_quick_ratio() > 0.9 and m.quick_ratio() > 0.9 and m.ratio() > 0.9), para[:60]
    math_lines = {line for doc in train["math"] for line in doc.splitlines()}
    assert not math_lines & {r["prompt"] + r["response"] for r in rows["math"]}
    code_train = "\n".join(train["code"])
    assert not any(r["text"] in code_train for r in rows["code"])


def test_eval_loss_matches_a_float64_recomputation(family_builder, tiny_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tiny_family.finetunes["code"]
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    texts = ["short", "a somewhat longer line of text, to force padding in the batch", "x = 1\n" * 40]
    got = family_builder.eval_loss(model, tok, texts, batch_size=2)

    total, count = 0.0, 0
    for text in texts:  # one sequence at a time: no padding, no mask
        ids = tok(text, truncation=True, max_length=family_builder.SEQ_LEN)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
        logp = logits - logits.max(axis=1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
        total -= sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1))
        count += len(ids) - 1
    assert got == pytest.approx(total / count, rel=1e-5)


def test_trained_build_runs_and_records_losses(family_builder, tmp_path):
    built = family_builder.build_family(tmp_path / "t", steps=3, seed=0, hidden=32, layers=2, eval_records=8, threads=1)
    assert set(built.losses) == {"base", *family_builder.FAMILY_MODELS}
    for row in built.losses.values():
        assert set(row) == set(family_builder.TASKS)
        assert all(math.isfinite(v) and v > 0 for v in row.values())
    marker = json.loads((built.root / "family.json").read_text())
    assert marker["steps"] == 3 and marker["eval_loss"] == built.losses

    # Training moved the base away from its seeded init, and each fine-tune away from the base.
    config = family_builder.tiny_config(marker["vocab_size"], hidden=32, layers=2)
    init = {k: v.double().numpy() for k, v in family_builder.init_base(config, 0).state_dict().items()}
    base = load64(built.base)
    assert not np.array_equal(base["model.layers.0.mlp.up_proj.weight"], init["model.layers.0.mlp.up_proj.weight"])
    for name in family_builder.FAMILY_MODELS:
        ft = load64(built.finetunes[name])
        assert not np.array_equal(ft["lm_head.weight"], base["lm_head.weight"]), name
        assert sorted(p.name for p in built.finetunes[name].glob("*.safetensors")) == SHARDS


def test_script_main_builds_and_rebuilds_its_own_directory(family_builder, tmp_path, capsys):
    out = tmp_path / "fam"
    threads = torch.get_num_threads()
    args = [str(out), "--steps", "0", "--threads", "1"]
    assert family_builder.main(args) == 0
    assert torch.get_num_threads() == threads  # the build's thread count does not leak
    assert family_builder.main(args) == 0  # an earlier family is replaced, not refused
    printed = capsys.readouterr().out
    assert str(out / "base") in printed and "data/math" in printed
    assert json.loads((out / "family.json").read_text())["finetunes"] == list(family_builder.FAMILY_MODELS)


def test_bad_arguments_raise_one_clear_error(family_builder, tiny_family, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(MergeplanError, match="not empty"):
        family_builder.build_family(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1
    with pytest.raises(MergeplanError, match="steps"):
        family_builder.build_family(tmp_path / "neg", steps=-1)
    with pytest.raises(MergeplanError, match="hidden"):
        family_builder.build_family(tmp_path / "odd", hidden=30)
    assert not (tmp_path / "neg").exists() and not (tmp_path / "odd").exists()  # checked before writing
    with pytest.raises(MergeplanError, match="no model 'poetry'"):
        tiny_family.model("poetry")


def test_tied_family_shares_embeddings_and_stores_them_once(family_builder, tmp_path):
    from transformers import AutoModelForCausalLM

    built = family_builder.build_family(tmp_path / "tied", tied=True, layers=2)
    for name, directory in built.models.items():
        weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
        assert "lm_head.weight" not in weight_map and sorted(set(weight_map.values())) == SHARDS, name
        model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), name
    base = load64(built.base)["model.embed_tokens.weight"]
    assert np.any(load64(built.finetunes["legal"])["model.embed_tokens.weight"] != base)
