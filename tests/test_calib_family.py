"""A tiny random Llama family (base + math/code/legal) with a trained tokenizer, built in a temp dir.

Used by the calibration and guide tests (import from test_calib_family); the tests in this
file check that the family is what those tests assume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

CORPUS = {
    "math": [
        "two plus two is four and four times three is twelve",
        "the sum of the angles of a triangle is one hundred eighty degrees",
        "solve for x when two x plus three equals eleven so x is four",
        "a prime number has exactly two divisors one and itself",
        "the square root of sixteen is four and of nine is three",
        "divide twelve by three to get four then add one for five",
    ],
    "code": [
        "def add ( a , b ) : return a + b",
        "for i in range ( 10 ) : print ( i )",
        "class node : def __init__ ( self ) : self . next = none",
        "import numpy as np ; x = np . zeros ( 3 )",
        "while true : break",
        "if x > 0 : return x else : return - x",
    ],
    "legal": [
        "the party of the first part shall indemnify the party of the second part",
        "this agreement is governed by the laws of the state",
        "the tenant shall pay rent on the first day of each month",
        "any dispute shall be settled by binding arbitration",
        "the contract terminates upon written notice of thirty days",
        "the licensee may not sublicense the rights granted herein",
    ],
}
TASKS = ("math", "code", "legal")


@dataclass
class Family:
    root: Path
    base: Path
    models: dict[str, Path] = field(default_factory=dict)
    data: dict[str, Path] = field(default_factory=dict)  # task -> jsonl
    text: Path | None = None  # plain text, blank-line separated documents


def build_tokenizer(out: Path, lines: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(out)
    return fast


def tiny_config(vocab: int, tie: bool = False, layers: int = 2, hidden: int = 16):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        tie_word_embeddings=tie, bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )


def build_family(root: Path, tie: bool = False, seed: int = 0, tasks=TASKS, layers: int = 2) -> Family:
    from transformers import LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    lines = [l for t in TASKS for l in CORPUS[t]]
    fam = Family(root=root, base=root / "base")
    tok = build_tokenizer(fam.base, lines)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_config(len(tok), tie, layers))
    with torch.no_grad():  # larger weights than the default init so statistics are far from zero
        for p in base.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    base.save_pretrained(fam.base)
    sd = base.state_dict()
    for k, task in enumerate(tasks):
        g = torch.Generator().manual_seed(seed * 100 + k + 1)
        ft = LlamaForCausalLM(tiny_config(len(tok), tie, layers))
        ft.load_state_dict({n: v + 0.05 * (k + 1) * torch.randn(v.shape, generator=g) for n, v in sd.items()})
        d = root / task
        ft.save_pretrained(d)
        fam.models[task] = d
        path = root / f"{task}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS[task]))
        fam.data[task] = path
    fam.text = root / "all.txt"
    fam.text.write_text("\n\n".join(lines) + "\n")
    return fam


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and much faster than on two when the cores are
    shared: every op of a 16-wide model would otherwise pay a thread-pool handshake."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_BUILT: dict[Path, Family] = {}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Family:
    """One family per test session, shared by every module that imports this fixture
    (tests only read it)."""
    root = tmp_path_factory.getbasetemp() / "calib_family"
    if root not in _BUILT:
        _BUILT[root] = build_family(root)
    return _BUILT[root]


def test_family_shares_vocabulary_and_names(family):
    from safetensors import safe_open

    names = {}
    for m, d in {"base": family.base, **family.models}.items():
        with safe_open(d / "model.safetensors", "pt") as f:
            names[m] = set(f.keys())
    assert len({frozenset(v) for v in names.values()}) == 1
    assert "model.layers.1.mlp.down_proj.weight" in names["base"]
    cfg = {json.loads((d / "config.json").read_text())["vocab_size"] for d in [family.base, *family.models.values()]}
    assert len(cfg) == 1


# -- float64 references, written independently of mergeplan.calibrate -----------------------
def texts_of(path: Path) -> list[str]:
    return [json.loads(l)["text"] for l in path.read_text().splitlines() if l.strip()]


def tokenise(base: Path, texts: list[str], seq_len: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return [tok(t, truncation=True, max_length=seq_len)["input_ids"] for t in texts]


def load64(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()


def module_inputs64(model, seqs: list[list[int]], names: list[str]) -> dict[str, "np.ndarray"]:
    """Each module's input rows over all tokens, running one unpadded sequence at a time in float64."""
    import numpy as np

    rows: dict[str, list] = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: rows[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).numpy().copy())
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            for s in seqs:
                model(input_ids=torch.tensor([s]))
    finally:
        for h in handles:
            h.remove()
    return {n: np.concatenate(v, axis=0) for n, v in rows.items()}
