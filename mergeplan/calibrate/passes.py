"""Passes of one resident model over one calibration set: activations, gradients, logits."""

from __future__ import annotations

from typing import Callable

import torch

from mergeplan.calibrate.activations import ActivationCollector, ActivationStats, first_nonfinite_module
from mergeplan.calibrate.gradients import SensitivityCollector, next_token_loss
from mergeplan.errors import MergeplanError

Batches = list[tuple[torch.Tensor, torch.Tensor]]
# (batch index, logits of the non-padding positions [n, vocab] on the device)
LogitSink = Callable[[int, torch.Tensor], None]


def _nonfinite(model, ids, mask, label: str, what: str) -> MergeplanError:
    where = first_nonfinite_module(model, ids, mask)
    at = f" first produced by {where}" if where else ""
    return MergeplanError(
        f"non-finite {what} (NaN/inf) in model {label!r}{at}; check that model's weights, or calibrate "
        "in float32 (calibration.dtype: float32)"
    )


def activation_pass(
    model: torch.nn.Module,
    modules: dict[str, torch.nn.Module],
    kinds: tuple[str, ...],
    batches: Batches,
    device: torch.device,
    label: str,
    advance: Callable[[], None] = lambda: None,
    sink: LogitSink | None = None,
) -> ActivationStats:
    """Forward only; statistics of the hooked modules, optionally handing logits to `sink`."""
    with torch.no_grad(), ActivationCollector(modules, kinds, label) as col:
        for b, (ids, mask) in enumerate(batches):
            ids, mask = ids.to(device), mask.to(device)
            col.begin_batch(mask)
            out = model(input_ids=ids, attention_mask=mask)
            col.end_batch()
            if sink is not None:
                sink(b, out.logits[mask.to(out.logits.device).bool()])
            del out
            advance()
        return col.result()


def logits_pass(
    model: torch.nn.Module, batches: Batches, device: torch.device, sink: LogitSink,
    label: str, advance: Callable[[], None] = lambda: None,
) -> None:
    with torch.no_grad():
        for b, (ids, mask) in enumerate(batches):
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            valid = logits[mask.to(logits.device).bool()]
            if not bool(torch.isfinite(valid).all()):
                raise _nonfinite(model, ids, mask, label, "logits")
            sink(b, valid)
            advance()


def sensitivity_pass(
    model: torch.nn.Module,
    batches: Batches,
    device: torch.device,
    label: str,
    modules: dict[str, torch.nn.Module] | None = None,
    kinds: tuple[str, ...] = ("sq",),
    sink: LogitSink | None = None,
    advance: Callable[[], None] = lambda: None,
) -> tuple[dict[str, float], ActivationStats | None]:
    """Forward + backward per batch (pass batches of one sample for per-sample sensitivity).

    Returns (parameter name -> sum |theta * grad|, activation statistics if modules were given).
    """
    col = ActivationCollector(modules, kinds, label) if modules else None
    with torch.enable_grad(), SensitivityCollector(model, label) as sens:
        if col:
            col.__enter__()
        try:
            for b, (ids, mask) in enumerate(batches):
                ids, mask = ids.to(device), mask.to(device)
                if col:
                    col.begin_batch(mask)
                logits = model(input_ids=ids, attention_mask=mask).logits
                if col:
                    col.end_batch()
                loss = next_token_loss(logits, ids, mask)
                if not bool(torch.isfinite(loss.detach())):
                    raise _nonfinite(model, ids, mask, label, f"loss on batch {b}")
                if sink is not None:
                    sink(b, logits.detach()[mask.to(logits.device).bool()])
                sens.backward(loss, f"batch {b}")
                del logits, loss
                advance()
        finally:
            if col:
                col.__exit__(None, None, None)
        return sens.result(), (col.result() if col else None)
