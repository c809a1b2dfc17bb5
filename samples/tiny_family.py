"""Build a tiny Llama model family (a base and three fine-tunes) plus calibration text, offline.

Everything comes from text that ships with the machine: licence texts under
/usr/share/common-licenses and Python standard-library sources. No network, no hub.

As a script (trained family, about a minute of one CPU core):

    python samples/tiny_family.py [OUT_DIR] [--steps N] [--seed S] [--hidden H] [--layers L]
                                  [--dtype float32|bfloat16|float16] [--threads T]

As a module (tests build a random family, steps=0, in about a second):

    from tiny_family import build_family
    fam = build_family(tmp_dir, steps=0)
    fam.base, fam.finetunes["math"], fam.data["math"]

Layout written under OUT_DIR:

    family.json              what was built (seed, steps, sizes, eval losses when trained)
    base/ math/ code/ legal/ config.json, generation_config.json, tokenizer files,
                             model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json
    data/general.txt         held-out licence paragraphs, separated by blank lines
    data/math.jsonl          {"prompt": "37+48=", "response": "85"}
    data/code.jsonl          {"text": <held-out stdlib source chunk>}
    data/legal.jsonl         {"text": <held-out licence paragraph in UPPER CASE>}

The fine-tunes start from the base and learn three different tasks: two-digit addition,
Python source, and all-caps licence text (the shouting warranty-disclaimer register).
Data files hold text none of the models (nor the tokenizer) trained on, near copies from
sibling licence versions included. The data does not depend on the seed,
so families built with different seeds share calibration text; it does depend on the
machine's licence files and Python version (recorded in family.json).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergeplan.errors import MergeplanError

FAMILY_MODELS: tuple[str, ...] = ("math", "code", "legal")
TASKS: tuple[str, ...] = ("general", "math", "code", "legal")
DATA_FILES: dict[str, str] = {
    "general": "general.txt",
    "math": "math.jsonl",
    "code": "code.jsonl",
    "legal": "legal.jsonl",
}
MARKER = "family.json"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, in this order
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
VOCAB_SIZE = 1536
SEQ_LEN = 128
BATCH_SIZE = 8
# Fine-tune batches keep REPLAY_ROWS rows of general text, as real fine-tunes mix in some
# pretraining data; without it the tiny fine-tunes forget general text entirely.
REPLAY_ROWS = 2
BASE_LR = 3e-3
FINETUNE_LR = 1e-3

LICENCE_DIR = Path("/usr/share/common-licenses")
# Pure-Python stdlib modules present in 3.10 through 3.14; missing ones are skipped.
CODE_TRAIN_MODULES = (
    "heapq.py", "bisect.py", "fractions.py", "statistics.py", "colorsys.py", "calendar.py",
    "difflib.py", "shlex.py", "textwrap.py", "csv.py", "dataclasses.py", "functools.py",
    "pprint.py", "argparse.py", "json/encoder.py", "json/decoder.py", "random.py",
    "copy.py", "fnmatch.py", "graphlib.py", "sched.py", "queue.py",
)
CODE_HELDOUT_MODULES = ("ipaddress.py", "contextlib.py", "tracemalloc.py", "locale.py")

# Paragraphs whose crc32 falls in bucket 5 of 8 are held out of all training. Hashing the
# text (not its position) keeps the split stable when a machine lacks some licence files.
HOLDOUT_BUCKETS = 8
HOLDOUT_BUCKET = 5
MIN_HELDOUT_CHARS = 80
MAX_RECORDS = 64
MATH_DATA_SEED = 1234  # the arithmetic problems are the same for every family seed


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TinyFamily:
    """Paths of a built family; `losses[model][task]` is filled for trained builds only."""

    root: Path
    base: Path
    finetunes: dict[str, Path]
    data: dict[str, Path]
    seed: int
    steps: int
    dtype: torch.dtype
    losses: dict[str, dict[str, float]] = field(default_factory=dict)

    def model(self, name: str) -> Path:
        """Directory of "base" or of a fine-tune by name."""
        if name == "base":
            return self.base
        if name not in self.finetunes:
            raise MergeplanError(
                f"tiny family has no model {name!r}; choose one of base, {', '.join(self.finetunes)}"
            )
        return self.finetunes[name]

    @property
    def models(self) -> dict[str, Path]:
        return {"base": self.base, **self.finetunes}


def data_paths(root: str | os.PathLike[str]) -> dict[str, Path]:
    """Task name -> calibration/eval file under `root`/data (whether or not built yet)."""
    return {task: Path(root) / "data" / name for task, name in DATA_FILES.items()}


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    """Text split once, the same for every seed: train_* feed training, heldout_* the data files."""

    train_paragraphs: tuple[str, ...]
    heldout_general: tuple[str, ...]
    heldout_legal: tuple[str, ...]  # still in original case; upper-cased when used
    train_code: tuple[str, ...]
    heldout_code: tuple[str, ...]
    train_math: tuple[str, ...]  # "a+b=c" lines
    heldout_math: tuple[tuple[str, str], ...]  # (prompt, response)
    sources: tuple[str, ...]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _licence_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = {Path(os.path.realpath(p)) for p in glob.glob(str(LICENCE_DIR / "*"))}
    files = sorted(p for p in found if p.is_file())
    if (stdlib / "LICENSE.txt").is_file():
        files.append(stdlib / "LICENSE.txt")
    return files


def _module_files(names: Sequence[str]) -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in names:
        path = stdlib / name
        if not path.is_file():  # e.g. a module that became a package in a later Python
            path = stdlib / name.removesuffix(".py") / "__init__.py"
        if path.is_file():
            out.append(path)
    return out


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _is_heldout(text: str) -> bool:
    return zlib.crc32(text.encode("utf-8")) % HOLDOUT_BUCKETS == HOLDOUT_BUCKET


def _shingles(text: str, n: int = 6) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def _drop_near_copies(train: list[str], heldout: list[str], overlap: float = 0.3) -> list[str]:
    """Training paragraphs minus those sharing >= `overlap` of a held-out paragraph's word
    6-grams: sibling licence versions (GPL-2/LGPL-2, GFDL-1.2/1.3) repeat paragraphs with
    small edits, and exact dedup alone would leak them into training."""
    owners: dict[tuple[str, ...], set[int]] = {}
    for i, para in enumerate(train):
        for gram in _shingles(para):
            owners.setdefault(gram, set()).add(i)
    drop: set[int] = set()
    for para in heldout:
        grams = _shingles(para)
        shared: dict[int, int] = {}
        for gram in grams:
            for i in owners.get(gram, ()):
                shared[i] = shared.get(i, 0) + 1
        drop.update(i for i, count in shared.items() if count >= overlap * len(grams))
    return [p for i, p in enumerate(train) if i not in drop]


def _code_chunks(source: str, max_chars: int = 1500) -> list[str]:
    """Top-level blocks (PEP 8 puts two blank lines between them), packed to <= max_chars."""
    chunks: list[str] = []
    for block in re.split(r"\n\n\n+", source):
        block = block.strip("\n")
        while len(block) > max_chars:  # cut long blocks at a line boundary
            cut = block.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            chunks.append(block[:cut])
            block = block[cut:].lstrip("\n")
        if block.strip():
            chunks.append(block)
    return [c for c in chunks if len(c) >= MIN_HELDOUT_CHARS]


def load_corpus() -> Corpus:
    """Read and split the machine's texts. Raises MergeplanError when they are missing."""
    licence_files = _licence_files()
    seen: dict[str, None] = {}  # dedupe identical paragraphs (GPL/LGPL share many)
    for path in licence_files:
        for para in _paragraphs(_read(path)):
            seen.setdefault(para, None)
    paragraphs = list(seen)
    if len(paragraphs) < 50:
        raise MergeplanError(
            f"found only {len(paragraphs)} licence paragraphs in {LICENCE_DIR} and the Python "
            "stdlib LICENSE.txt; install the base-files/common-licenses package or run on a "
            "machine that has them"
        )
    heldout = [p for p in paragraphs if _is_heldout(p) and len(p) >= MIN_HELDOUT_CHARS]
    train_paras = tuple(_drop_near_copies([p for p in paragraphs if not _is_heldout(p)], heldout))
    # Alternate the held-out paragraphs between the general and legal sets, so each task's
    # eval text is unseen by every model, including the other task's fine-tune.
    heldout_general = tuple(heldout[0::2])
    heldout_legal = tuple(heldout[1::2])

    train_code_files = _module_files(CODE_TRAIN_MODULES)
    heldout_code_files = _module_files(CODE_HELDOUT_MODULES)
    if not train_code_files or not heldout_code_files:
        raise MergeplanError(
            f"Python stdlib sources not found under {sysconfig.get_paths()['stdlib']}; "
            "use a Python installation that ships its .py sources"
        )
    train_code = tuple(_read(p) for p in train_code_files)
    heldout_code = tuple(c for p in heldout_code_files for c in _code_chunks(_read(p)))

    gen = torch.Generator().manual_seed(MATH_DATA_SEED)
    pairs = [(a, b) for a in range(100) for b in range(100)]
    train_pairs = [(a, b) for a, b in pairs if (a * 100 + b) % 10 != 7]
    heldout_pairs = [(a, b) for a, b in pairs if (a * 100 + b) % 10 == 7]
    order = torch.randperm(len(train_pairs), generator=gen).tolist()
    train_math = tuple(f"{train_pairs[i][0]}+{train_pairs[i][1]}={sum(train_pairs[i])}" for i in order)
    pick = torch.randperm(len(heldout_pairs), generator=gen)[:MAX_RECORDS].tolist()
    heldout_math = tuple((f"{heldout_pairs[i][0]}+{heldout_pairs[i][1]}=", str(sum(heldout_pairs[i]))) for i in pick)

    sources = tuple(str(p) for p in [*licence_files, *train_code_files, *heldout_code_files])
    return Corpus(
        train_paragraphs=train_paras,
        heldout_general=heldout_general,
        heldout_legal=heldout_legal,
        train_code=train_code,
        heldout_code=heldout_code,
        train_math=train_math,
        heldout_math=heldout_math,
        sources=sources,
    )


def task_records(corpus: Corpus) -> dict[str, list[dict[str, str]]]:
    """The records written to data/: held-out text only, at most MAX_RECORDS per task."""
    return {
        "general": [{"text": p} for p in corpus.heldout_general[:MAX_RECORDS]],
        "math": [{"prompt": p, "response": r} for p, r in corpus.heldout_math[:MAX_RECORDS]],
        "code": [{"text": c} for c in corpus.heldout_code[:MAX_RECORDS]],
        "legal": [{"text": p.upper()} for p in corpus.heldout_legal[:MAX_RECORDS]],
    }


def record_text(record: dict[str, str]) -> str:
    return record["text"] if "text" in record else record["prompt"] + record["response"]


def write_data(corpus: Corpus, root: Path) -> dict[str, Path]:
    paths = data_paths(root)
    paths["general"].parent.mkdir(parents=True, exist_ok=True)
    records = task_records(corpus)
    for task, path in paths.items():
        if path.suffix == ".txt":
            body = "\n\n".join(r["text"] for r in records[task]) + "\n"
        else:
            body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records[task])
        path.write_text(body, encoding="utf-8", newline="\n")
    return paths


def training_texts(corpus: Corpus) -> dict[str, list[str]]:
    """Stage name -> documents it trains on ("base" is general licence text)."""
    # Math lines go in documents of 16 problems so packing sees newlines between them.
    lines = corpus.train_math
    math_docs = ["\n".join(lines[i : i + 16]) for i in range(0, len(lines), 16)]
    return {
        "base": list(corpus.train_paragraphs),
        "math": math_docs,
        "code": list(corpus.train_code),
        "legal": [p.upper() for p in corpus.train_paragraphs],
    }


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(corpus: Corpus, vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE trained on every training text (all four registers), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [doc for docs in training_texts(corpus).values() for doc in docs]
    tok.train_from_iterator(texts, trainer=trainer)
    # Llama convention: a BOS in front of every sequence, no EOS appended.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=4 * SEQ_LEN,
    )


def save_tokenizer(tokenizer, directory: Path) -> None:
    tokenizer.save_pretrained(directory)
    # transformers 5 records its own class name; the classic name loads in 4.x and 5.x alike.
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- model


def _check_shape(hidden: int, layers: int) -> None:
    if hidden % 16 != 0 or hidden <= 0:
        raise MergeplanError(f"hidden={hidden} must be a positive multiple of 16 (4 heads of even size)")
    if layers <= 0:
        raise MergeplanError(f"layers={layers} must be at least 1")


def tiny_config(vocab_size: int, hidden: int = 64, layers: int = 4, tied: bool = False):
    from transformers import LlamaConfig

    _check_shape(hidden, layers)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        # ~8/3 * hidden, as Llama sizes its MLP; 172 at hidden 64, not a power of two on purpose.
        intermediate_size=(hidden * 8 // 3 + 3) // 4 * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: k/v projections are narrower than q
        max_position_embeddings=4 * SEQ_LEN,
        tie_word_embeddings=tied,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def init_base(config, seed: int):
    """Random Llama whose weights come only from `seed`, not from transformers' init order."""
    from transformers import GenerationConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                # Not all ones: elementwise code (AIM on norms) must not pass by accident.
                param.copy_(1.0 + 0.05 * noise)
            else:
                param.copy_(config.initializer_range * noise)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False, max_new_tokens=32
    )
    return model


# Per fine-tune, std of the random task vector added to each kind of tensor (steps=0 only).
# math moves attention, code moves the MLP, legal moves embeddings/norms and deeper layers
# more than shallow ones, and touches only a sparse 10% of its entries.
PERTURB = {
    "math": {"attn": 4e-3, "mlp": 5e-4, "norm": 0.0, "embed": 0.0, "depth": False, "density": 1.0},
    "code": {"attn": 5e-4, "mlp": 4e-3, "norm": 0.0, "embed": 0.0, "depth": False, "density": 1.0},
    "legal": {"attn": 2e-3, "mlp": 2e-3, "norm": 5e-2, "embed": 4e-3, "depth": True, "density": 0.1},
}


def _kind(name: str) -> str:
    if ".self_attn." in name:
        return "attn"
    if ".mlp." in name:
        return "mlp"
    if name.endswith("norm.weight"):
        return "norm"
    return "embed"  # embed_tokens and lm_head


def _layer_index(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def perturbed_state(base_state: dict[str, torch.Tensor], name: str, seed: int, layers: int) -> dict[str, torch.Tensor]:
    """Base weights plus a deterministic random task vector shaped by PERTURB[name]."""
    spec = PERTURB[name]
    gen = torch.Generator().manual_seed(seed * 1000 + 1 + FAMILY_MODELS.index(name))
    out = {}
    for key in sorted(base_state):
        w = base_state[key]
        kind = _kind(key)
        std = float(spec[kind])
        layer = _layer_index(key)
        if spec["depth"] and layer is not None:
            std *= (layer + 1) / layers
        delta = torch.randn(w.shape, generator=gen, dtype=torch.float32) * std
        if spec["density"] < 1.0:
            keep = torch.rand(w.shape, generator=gen) < spec["density"]
            delta = delta * keep
        out[key] = w.float() + delta
    return out


def _params(model) -> dict[str, torch.Tensor]:
    """float32 copies of the parameters; a tied lm_head appears once, as embed_tokens."""
    return {k: v.detach().float().clone() for k, v in model.named_parameters()}


def _load_params(model, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state[name])


# --------------------------------------------------------------------------- saving


def two_shard_size(state: dict[str, torch.Tensor]) -> int:
    """Smallest max_shard_size (bytes) for which huggingface_hub splits `state` into 2 shards."""
    from huggingface_hub import split_torch_state_dict_into_shards

    total = sum(t.numel() * t.element_size() for t in state.values())
    step = max(1, total // 256)
    for size in range((total + 1) // 2, total + 1, step):
        if len(split_torch_state_dict_into_shards(state, max_shard_size=size).filename_to_tensors) == 2:
            return size
    raise AssertionError("no shard size gives two shards")  # only if one tensor dominates


def save_model(model, tokenizer, directory: Path, dtype: torch.dtype) -> None:
    """Cast `model` to `dtype` in place and save it as exactly two safetensors shards."""
    model = model.to(dtype)
    state = model.state_dict()
    model.save_pretrained(directory, safe_serialization=True, max_shard_size=two_shard_size(state))
    save_tokenizer(tokenizer, directory)
    if not (directory / "model.safetensors.index.json").is_file():
        raise AssertionError(f"{directory}: expected a sharded save")


# --------------------------------------------------------------------------- training


def token_stream(tokenizer, docs: Sequence[str]) -> torch.Tensor:
    """All documents as one id stream, each wrapped in BOS ... EOS."""
    ids: list[int] = []
    # The raw tokenizers object: documents longer than model_max_length are fine here
    # (they are cut into windows), so skip the wrapper's length warning.
    for enc in tokenizer.backend_tokenizer.encode_batch(list(docs), add_special_tokens=False):
        ids.append(BOS_ID)
        ids.extend(enc.ids)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


def batches(mix: Sequence[tuple[torch.Tensor, int]], steps: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Random SEQ_LEN windows, `count` per batch from each (stream, count); `gen` fixes the order."""
    for _ in range(steps):
        rows = []
        for stream, count in mix:
            starts = torch.randint(0, stream.numel() - SEQ_LEN, (count,), generator=gen)
            rows.extend(stream[s : s + SEQ_LEN] for s in starts.tolist())
        yield torch.stack(rows)


def train(
    model,
    mix: Sequence[tuple[torch.Tensor, int]],
    steps: int,
    lr: float,
    gen: torch.Generator,
    log: Callable[[str], None],
    label: str,
) -> None:
    """AdamW with a short warmup and cosine decay; no weight decay, so untouched rows stay put."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    start = time.perf_counter()
    for step, batch in enumerate(batches(mix, steps, gen)):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step == 0 or (step + 1) % max(1, steps // 4) == 0 or step + 1 == steps:
            took = time.perf_counter() - start
            log(f"  {label:<6} step {step + 1:>4}/{steps}  loss {loss.item():.3f}  {took:5.1f} s")
    model.eval()


def _stage_gen(seed: int, stage: str) -> torch.Generator:
    """One generator per training stage, so changing one stage never reshuffles another."""
    return torch.Generator().manual_seed(seed * 1000 + zlib.crc32(stage.encode()) % 1000)


@torch.no_grad()
def eval_loss(model, tokenizer, texts: Sequence[str], batch_size: int = 16) -> float:
    """Mean next-token cross-entropy over all tokens of `texts` (each truncated to SEQ_LEN)."""
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=SEQ_LEN, return_tensors="pt"
        )
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
        labels = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += loss.item()
        count += int((labels != -100).sum())
    return total / max(1, count)


def eval_family(family: TinyFamily, max_records: int = MAX_RECORDS) -> dict[str, dict[str, float]]:
    """Loss of every saved model on every task's data file: losses[model][task]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = {task: [record_text(r) for r in read_records(path)][:max_records] for task, path in family.data.items()}
    losses: dict[str, dict[str, float]] = {}
    for name, directory in family.models.items():
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        losses[name] = {task: eval_loss(model, tokenizer, t) for task, t in texts.items()}
    return losses


def read_records(path: Path) -> list[dict[str, str]]:
    """Records of a data file: JSONL lines, or blank-line-separated paragraphs of a .txt."""
    body = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [{"text": p} for p in _paragraphs(body)]
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def format_losses(losses: dict[str, dict[str, float]]) -> str:
    head = "model  " + "".join(f"{t:>9}" for t in TASKS)
    rows = [f"{name:<7}" + "".join(f"{row[t]:>9.3f}" for t in TASKS) for name, row in losses.items()]
    return "\n".join([head, *rows])


# --------------------------------------------------------------------------- build


def _prepare_out_dir(root: Path) -> None:
    """Refuse to write into a non-empty directory that is not an earlier tiny family."""
    if root.exists() and not root.is_dir():
        raise MergeplanError(f"{root} is a file; pass a directory for the tiny family")
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise MergeplanError(
            f"{root} is not empty and holds no {MARKER}; pass an empty or new directory "
            "(only an earlier tiny family is overwritten)"
        )
    for sub in ("base", *FAMILY_MODELS, "data"):
        if (root / sub).is_dir():
            shutil.rmtree(root / sub)
    root.mkdir(parents=True, exist_ok=True)


def build_family(
    out_dir: str | os.PathLike[str],
    steps: int = 0,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 4,
    dtype: torch.dtype = torch.float32,
    tied: bool = False,
    evaluate: bool | None = None,
    eval_records: int = MAX_RECORDS,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TinyFamily:
    """Build base + FAMILY_MODELS fine-tunes + data files under `out_dir`.

    steps=0: random base (seed) and fine-tunes = base + structured random task vectors
    (see PERTURB); about a second. steps>0: train the base `steps` optimizer steps on
    licence text, then fine-tune a copy of it `steps` steps on each task. Weights are
    saved in `dtype` (training always runs in float32). `evaluate` (default: steps > 0)
    fills `losses` and family.json with each model's loss on the first `eval_records`
    records of each data file. `threads` sets torch's CPU threads for the build only
    (None: leave them). Same arguments, thread count and machine texts -> identical bytes.
    """
    if threads is not None and threads < 1:
        raise MergeplanError(f"threads={threads} must be at least 1")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _build(Path(out_dir), steps, seed, hidden, layers, dtype, tied, evaluate, eval_records, log)
    finally:
        torch.set_num_threads(previous)


def _build(
    root: Path,
    steps: int,
    seed: int,
    hidden: int,
    layers: int,
    dtype: torch.dtype,
    tied: bool,
    evaluate: bool | None,
    eval_records: int,
    log: Callable[[str], None] | None,
) -> TinyFamily:
    if steps < 0:
        raise MergeplanError(f"steps={steps} must be >= 0 (0 builds a random family without training)")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise MergeplanError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
    _check_shape(hidden, layers)
    log = log or (lambda _msg: None)
    evaluate = steps > 0 if evaluate is None else evaluate
    _prepare_out_dir(root)
    # Marked first, so a build that dies half-way can be rebuilt in place.
    pending = {"builder": "samples/tiny_family.py", "complete": False}
    (root / MARKER).write_text(json.dumps(pending) + "\n", encoding="utf-8")

    corpus = load_corpus()
    tokenizer = train_tokenizer(corpus)
    config = tiny_config(len(tokenizer), hidden=hidden, layers=layers, tied=tied)
    base = init_base(config, seed)
    finetunes = {name: root / name for name in FAMILY_MODELS}

    if steps == 0:
        base_state = _params(base)
        save_model(base, tokenizer, root / "base", dtype)
        for name in FAMILY_MODELS:
            ft = init_base(config, seed)
            _load_params(ft, perturbed_state(base_state, name, seed, layers))
            save_model(ft, tokenizer, finetunes[name], dtype)
    else:
        texts = training_texts(corpus)
        streams = {stage: token_stream(tokenizer, docs) for stage, docs in texts.items()}
        general = streams["base"]
        log(f"training base {steps} steps on licence text ({general.numel()} tokens)")
        train(base, [(general, BATCH_SIZE)], steps, lr=BASE_LR, gen=_stage_gen(seed, "base"), log=log, label="base")
        trained_state = _params(base)
        save_model(base, tokenizer, root / "base", dtype)
        for name in FAMILY_MODELS:
            log(f"fine-tuning {name} {steps} steps from base ({streams[name].numel()} tokens)")
            ft = init_base(config, seed)
            _load_params(ft, trained_state)
            mix = [(streams[name], BATCH_SIZE - REPLAY_ROWS), (general, REPLAY_ROWS)]
            train(ft, mix, steps, lr=FINETUNE_LR, gen=_stage_gen(seed, name), log=log, label=name)
            save_model(ft, tokenizer, finetunes[name], dtype)

    data = write_data(corpus, root)
    family = TinyFamily(
        root=root, base=root / "base", finetunes=finetunes, data=data, seed=seed, steps=steps, dtype=dtype
    )
    if evaluate:
        start = time.perf_counter()
        losses = eval_family(family, max_records=eval_records)
        log(f"evaluated {len(losses)} models on {len(TASKS)} tasks in {time.perf_counter() - start:.1f} s")
    else:
        losses = {}
    family = TinyFamily(**{**family.__dict__, "losses": losses})
    _write_marker(family, hidden=hidden, layers=layers, tied=tied, corpus=corpus, vocab=len(tokenizer))
    return family


def _write_marker(family: TinyFamily, *, hidden: int, layers: int, tied: bool, corpus: Corpus, vocab: int) -> None:
    info = {
        "builder": "samples/tiny_family.py",
        "complete": True,
        "seed": family.seed,
        "steps": family.steps,
        "dtype": str(family.dtype).removeprefix("torch."),
        "hidden": hidden,
        "layers": layers,
        "tied_embeddings": tied,
        "vocab_size": vocab,
        "base": "base",
        "finetunes": list(FAMILY_MODELS),
        "data": {task: f"data/{name}" for task, name in DATA_FILES.items()},
        "python": ".".join(map(str, sys.version_info[:3])),
        "sources": list(corpus.sources),
        "eval_loss": family.losses,
    }
    (family.root / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- script


def main(argv: Sequence[str] | None = None) -> int:
    default_out = Path(__file__).resolve().parent / "family"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default=str(default_out), help=f"output directory (default {default_out})")
    parser.add_argument(
        "--steps", type=int, default=200,
        help="optimizer steps for the base and for each fine-tune; 0 = random family (default 200)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="dtype of the saved weights"
    )
    # One thread by default: ~30% slower than two on an idle 2-core box, but 5-30x faster
    # when other processes share the cores (OpenMP workers spin waiting for each other).
    # Bytes are reproducible for a fixed thread count only, so the default must not vary.
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1); the same count gives the same bytes"
    )
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per model is noise here
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        family = build_family(
            args.out_dir, steps=args.steps, seed=args.seed, hidden=args.hidden, layers=args.layers,
            dtype=getattr(torch, args.dtype), threads=args.threads, log=print,
        )
    except MergeplanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"\nwrote {family.root}")
    for name, path in family.models.items():
        print(f"  {name:<6} {path}")
    for task, path in family.data.items():
        print(f"  data/{task:<8} {path}  ({len(read_records(path))} records)")
    if family.losses:
        print("\neval loss (nats/token) on held-out data; rows: model, columns: task")
        print(format_losses(family.losses))
    # CPU time next to wall time tells a slow build on a busy machine from a slow machine.
    print(f"\nbuilt in {elapsed:.1f} s wall, {cpu:.1f} s CPU, torch threads: {args.threads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
