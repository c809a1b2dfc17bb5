"""Tiny random models of real architectures, built locally from transformers configs.

Each family is a base plus two fine-tunes (base + small seeded noise on every float tensor),
all sharing a word-level tokenizer built from the calibration text, saved with
save_pretrained exactly as a user's checkpoints are (so MoE experts are stored per expert,
GPT-NeoX's head as embed_out, GPT-2's Conv1D weights [in, out]).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

VOCAB = 128
TEXT = """the cat sat on the mat and the dog ran to the park
a bird sang in the tree while the sun rose over the hill
we read a book about the sea and the ship that sailed far
code runs when the input is right and the test is green
merge the models and check the output for every layer
small models learn fast but forget the long story soon
"""


def _configs():
    import transformers as tf

    c = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "llama": lambda: tf.LlamaConfig(**c),
        "mistral": lambda: tf.MistralConfig(**c, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**c),
        "qwen3": lambda: tf.Qwen3Config(**c, head_dim=8),
        "gemma2": lambda: tf.Gemma2Config(**c, head_dim=8),
        "gemma3": lambda: tf.Gemma3TextConfig(**c, head_dim=8),
        "phi3": lambda: tf.Phi3Config(**c),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2),
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                             bos_token_id=1, eos_token_id=2),
        # 5 experts, top 2: layer 0's router never picks expert 4 (see _idle_expert).
        "mixtral": lambda: tf.MixtralConfig(**c, num_local_experts=5, num_experts_per_tok=2),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**c, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=32),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**c, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=32),
    }


ARCHS = tuple(_configs())


@dataclass
class Family:
    arch: str
    root: Path
    base: Path
    finetunes: dict[str, Path]
    data: Path


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(TEXT.split()))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    # as many tokens as embedding rows, as real checkpoints have: added tokens then get new rows
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def _idle_expert(model: torch.nn.Module) -> None:
    """Layer 0's router: experts (0, 1) and (2, 3) get opposite logits c*x.v, -c*x.v and
    c*x.u, -c*x.u and expert 4 exactly 0 (in the fine-tunes too), so the top 2 are always one
    of each pair and no token ever reaches expert 4 there: the guides must report it, not
    fail. c = 2 keeps float32's softmax from underflowing to ties with expert 4."""
    gate = model.model.layers[0].mlp.gate.weight
    with torch.no_grad():
        v, u = torch.randn(2, gate.shape[1])
        gate.zero_()
        gate[0], gate[1], gate[2], gate[3] = 2 * v, -2 * v, 2 * u, -2 * u


def build(arch: str, root: Path, noise: float = 0.02) -> Family:
    from transformers import AutoModelForCausalLM

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[arch]())
    if arch == "mixtral":
        _idle_expert(model)
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dirs = {}
    for i, name in enumerate(("base", "math", "code")):
        if i:
            g = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                for k, p in model.state_dict().items():
                    if p.is_floating_point():
                        p.copy_(base_sd[k] + noise * torch.randn(p.shape, generator=g))
                if arch == "mixtral":  # keep expert 4 unreachable in layer 0 (see _idle_expert)
                    model.model.layers[0].mlp.gate.weight[4].zero_()
        d = root / name
        model.save_pretrained(d)
        tok.save_pretrained(d)
        dirs[name] = d
    data = root / "calib.txt"
    data.write_text("\n\n".join(TEXT.strip().splitlines()) + "\n")
    return Family(arch, root, dirs["base"], {"math": dirs["math"], "code": dirs["code"]}, data)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def add_tokens(src: Path, dst: Path, tokens: list[str], seed: int = 7) -> Path:
    """A fine-tune of `src` whose tokenizer gained `tokens` (ids from the old vocab size on) and
    whose embeddings and head grew by as many trained rows (transformers' resize_token_embeddings)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src))
    tok = AutoTokenizer.from_pretrained(str(src))
    old = model.get_input_embeddings().weight.shape[0]
    tok.add_tokens(tokens)
    model.resize_token_embeddings(old + len(tokens))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None}.values():
            emb.weight[old:] = 0.02 * torch.randn(emb.weight[old:].shape, generator=g)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return Path(dst)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: torch's per-op thread handoff costs more than the op, and on a
    shared machine two threads per test worker oversubscribe the cores (5x slower here)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
