"""Loss of the base, each fine-tune and merged model(s) on every task of a tiny family.

    python samples/evaluate.py FAMILY_DIR MERGED_DIR [MERGED_DIR ...]

Lower is better; a good merge sits near each fine-tune on its own task.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_family import MAX_RECORDS, TASKS, data_paths, eval_loss, read_records, record_text  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    family = Path(argv[0])
    texts = {t: [record_text(r) for r in read_records(p)][:MAX_RECORDS] for t, p in data_paths(family).items()}
    models = {n: family / n for n in ("base", "math", "code", "legal") if (family / n).is_dir()}
    models.update({Path(m).name: Path(m) for m in argv[1:]})
    print("loss".ljust(16) + "".join(f"{t:>9}" for t in TASKS))
    for name, directory in models.items():
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        print(name[:15].ljust(16) + "".join(f"{eval_loss(model, tok, texts[t]):>9.3f}" for t in TASKS))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
