"""Held-out evaluation of merges: what `mergeplan eval` runs, and the API a search calls.

    from mergeplan.evaluate import (load_eval_sets, score_model, merge_in_memory, load_merged,
                                    recovered_gain, mean_gain, bootstrap_ci)

    sets = load_eval_sets({"math": "data/math.jsonl"}, tokenizer, samples=64, seq_len=128, skip=16)
    tensors = merge_in_memory(plan, threads=2)              # apply's engine, no output dir
    model = load_merged(plan, tensors)                      # base architecture, float32, eval mode
    scores = score_model(model, sets, device="cpu")         # task -> SampleScores (per-sample sums)
    scores = score_plan(plan, sets, threads=2)              # the three lines above, model freed after
    g = mean_gain(base_scores, scores, expert_scores)       # mean recovered gain over tasks
    ci = bootstrap_ci(lambda idx: mean_gain(base_scores, scores, expert_scores, idx), sizes_of(scores))

Modules: data.py (held-out sets from calibration sources, skip/limit), score.py (per-sample
loss and accuracy of one model), memory.py (in-memory merge of a plan, model from
tensors), stats.py (gain, paired bootstrap), run.py (`mergeplan eval`: targets,
baselines, experts, one model resident at a time), report.py (tables, JSON).
Importing this package imports torch.
"""

from mergeplan.evaluate.data import EvalSet, load_eval_sets, parse_data_spec, texts_set
from mergeplan.evaluate.memory import load_merged, merge_in_memory
from mergeplan.evaluate.run import score_plan
from mergeplan.evaluate.score import SampleScores, score_model
from mergeplan.evaluate.stats import (
    Interval,
    bootstrap_ci,
    mean_gain,
    recovered_gain,
    resample,
    sizes_of,
    task_gain,
    task_loss,
)

__all__ = [
    "EvalSet", "Interval", "SampleScores", "bootstrap_ci", "load_eval_sets", "load_merged", "mean_gain",
    "merge_in_memory", "parse_data_spec", "recovered_gain", "resample", "score_model", "score_plan",
    "sizes_of",
    "task_gain", "task_loss", "texts_set",
]
