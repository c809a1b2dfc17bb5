"""Turn a recipe's model reference into a local directory (local path or Hugging Face Hub id)."""

from __future__ import annotations

import re
from pathlib import Path

from mergeplan.errors import MergeplanError

# Only what a merge needs: weights, configs, tokenizer. Never pickles.
HUB_ALLOW_PATTERNS = [
    "*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "spiece.model",
    "sentencepiece.bpe.model", "vocab.txt", "merges.txt", "chat_template.jinja",
]

# org/name, optionally @revision (mergekit's spelling of a pinned hub model).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")


def looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and ".." not in ref


def resolve_model_path(ref: str, base_dir: Path) -> Path:
    """Local directory for `ref`: an existing path (relative to `base_dir`), else a hub download.

    A hub id ("org/name" or "org/name@revision") is fetched with
    huggingface_hub.snapshot_download, limited to safetensors, JSON and tokenizer files,
    and served from the local cache when already there (HF_HUB_OFFLINE=1 forces that).
    """
    local = Path(ref).expanduser()
    if not local.is_absolute():
        local = Path(base_dir) / local
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise MergeplanError(
            f"model {ref!r} resolves to {local}, which is a file; give the model directory"
        )
    if not looks_like_hub_id(ref):
        raise MergeplanError(
            f"model directory {local} does not exist (from {ref!r}, relative to {base_dir})"
        )
    repo_id, _, revision = ref.partition("@")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id, revision=revision or None, allow_patterns=HUB_ALLOW_PATTERNS
        )
    except Exception as e:  # offline, unknown repo, gated, HTTP: all end the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MergeplanError(
            f"model {ref!r} is not a local directory ({local} does not exist) and could not be "
            f"fetched from the Hugging Face Hub: {reason}; give a local path, or check the id, "
            "your network and login (HF_HUB_OFFLINE=1 uses only the local cache)"
        ) from None
    return Path(path)
