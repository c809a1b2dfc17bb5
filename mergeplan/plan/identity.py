"""The decision digest: one name for "these inputs, merged these exact ways".

The file digest (codec.body_digest) changes with anything in the file: creation time,
calibration timings, the paths as someone typed them. Two people who plan the same recipe
on the same inputs must still be able to tell that they will get the same bytes, so the
decision digest covers only what determines apply's output plus what it was made from:

covered: method, params, seed, out_dtype, max_shard_size, aux_files, the recipe text,
  each model's id, role, fingerprint (shards, tensor table, content digests, copied files)
  and hub revision, and each tensor's name, shape, dtype, op, source, params,
  contributions (model, weight, mask spec with digest/cutoff/bits) and relaxation.
not covered: created, mergeplan_version, edit_log, notes, recipe path and dir, model paths,
  guide and calibration records (settings, timings, device; the recipe text holds the
  settings and the tensors hold the decisions), plan- and tensor-level statistics, and
  who set each value (`contributions[].source`).

An edited plan whose values end up equal to another plan's has that plan's digest; the
edit log (summarised in the model card) says it was edited.
"""

from __future__ import annotations

from . import canonical
from .model import Plan


def decision_record(plan: Plan) -> dict:
    rec = {
        "method": plan.method,
        "params": plan.params,
        "seed": plan.seed,
        "out_dtype": plan.out_dtype,
        "max_shard_size": plan.max_shard_size,
        "aux_files": plan.aux_files,
        "recipe_text": plan.recipe.get("text", "") if isinstance(plan.recipe, dict) else "",
        "models": [{"id": m.id, "role": m.role, "fingerprint": m.fingerprint, "hub": m.hub} for m in plan.models],
        "tensors": [
            {
                "name": t.name, "shape": list(t.shape), "dtype": t.dtype, "op": t.op, "source": t.source,
                "params": t.params, "relax": t.relax,
                "contributions": [{"model": c.model, "weight": c.weight, "mask": c.mask} for c in t.contributions],
            }
            for t in plan.tensors
        ],
    }
    if plan.aux_model is not None:  # only when set, so digests of plans without it do not change
        rec["aux_model"] = plan.aux_model
    return rec


def decision_digest(plan: Plan) -> str:
    return "sha256:" + canonical.sha256(decision_record(plan))


def edit_summary(plan: Plan) -> dict:
    """{edited, sessions, changes, tools} from the edit log, for model cards and show."""
    log = plan.edit_log or []
    changes = sum(len(e.get("changes", [])) for e in log if isinstance(e, dict))
    tools = sorted({str(e.get("tool", "?")) for e in log if isinstance(e, dict)})
    return {"edited": bool(log), "sessions": len(log), "changes": changes, "tools": tools}



