"""Loss of the base, each fine-tune and merged model(s) on every task of a tiny family.

    python samples/evaluate.py FAMILY_DIR MERGED_DIR|PLAN [MERGED_DIR|PLAN ...] [--threads N] [--records N]

Lower is better; a good merge sits near each fine-tune on its own task. A PLAN is merged
in memory (as `mergeplan apply` would, without writing it). Texts are each task's data
file as samples/tiny_family.py reads it (the losses family.json records); scoring is
mergeplan.evaluate's. Progress goes to stderr; --threads (default 1: tiny models are
fastest on one core, and a busy machine is not oversubscribed) sets torch's threads.
`mergeplan eval` gives the same losses plus token accuracy and recovered gain.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_family import MAX_RECORDS, SEQ_LEN, TASKS, data_paths, read_records, record_text  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("family")
    ap.add_argument("merged", nargs="+", help="merged model directories or plan files")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--records", type=int, default=MAX_RECORDS, help="records per task (the first ones)")
    ap.add_argument("--quiet", "-q", action="store_true")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.records < 1:
        ap.error("--threads and --records must be at least 1")

    import torch  # after argument parsing: --help stays instant

    from mergeplan.calibrate.models import load_tokenizer
    from mergeplan.calibrate.progress import CalibProgress
    from mergeplan.errors import MergeplanError
    from mergeplan.evaluate.data import texts_set
    from mergeplan.evaluate.memory import load_merged, merge_in_memory
    from mergeplan.evaluate.run import load_model_dir
    from mergeplan.evaluate.score import score_model
    from mergeplan.plan.codec import read_plan

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    family = Path(args.family)
    torch.set_num_threads(args.threads)
    try:
        tok = load_tokenizer(family / "base")
        sets = {t: texts_set(t, [record_text(r) for r in read_records(p)][: args.records], tok, SEQ_LEN, str(p))
                for t, p in data_paths(family).items()}
        models = {n: family / n for n in ("base", "math", "code", "legal") if (family / n).is_dir()}
        models.update({Path(m).name: Path(m) for m in args.merged})
        print("loss".ljust(16) + "".join(f"{t:>9}" for t in TASKS), flush=True)
        with CalibProgress(args.quiet, prefix="evaluate") as progress:
            for name, path in models.items():
                if path.is_file():
                    plan = read_plan(path)
                    with progress.task(f"{name} · merge in memory", len(plan.tensors)) as adv:
                        tensors = merge_in_memory(plan, threads=args.threads, plan_path=str(path),
                                                  progress=lambda *_: adv())
                    model = load_merged(plan, tensors, plan_path=str(path))
                    torch.set_num_threads(args.threads)
                else:
                    model = load_model_dir(path, torch.device("cpu"))
                batches = sum(-(-len(s.samples) // 16) for s in sets.values())
                with progress.task(f"{name} · {len(sets)} tasks", batches) as adv:
                    scores = score_model(model, sets, "cpu", batch_size=16, advance=lambda _t: adv())
                del model
                print(name[:15].ljust(16) + "".join(f"{scores[t].loss:>9.3f}" for t in TASKS), flush=True)
    except MergeplanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
