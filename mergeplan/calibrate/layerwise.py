"""LEWIS's optional Wanda pass: measure a decoder block, prune it, feed its output to the next.

The LEWIS reference prunes every block (Wanda: per output row, drop the inputs with the
smallest |W_ij| * sqrt(mean x_j^2)) before it measures the next block, so later blocks see
the inputs of a pruned model. This runs block by block over cached hidden states: the
inputs of block 0 are captured once (with the keyword arguments the model passes, such as
rotary embeddings and the attention mask), then each block runs twice per batch: once to
measure, once pruned to produce the next block's inputs. The model's weights are changed in
place; the caller must not use it for anything else afterwards.
"""

from __future__ import annotations

from typing import Callable

import torch

from mergeplan.calibrate.activations import ActivationCollector, ActivationStats, column_sq_norms
from mergeplan.calibrate.modules import Site, decoder_layers, site_module


class _Captured(Exception):
    pass


def _capture_block_inputs(model, layers, batches, device) -> list[tuple[torch.Tensor, dict]]:
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items()}))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids, mask in batches:
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device))
                except _Captured:
                    pass
    finally:
        handle.remove()
    return captured


def wanda_prune_(weight: torch.Tensor, mean_sq: torch.Tensor, sparsity: float, axis: int) -> None:
    """Zero, in each output row, the `sparsity` fraction of inputs with the lowest Wanda metric.

    Equal metrics: the lower input index is pruned first (a stable sort), as in the reference.
    """
    w = weight.data if axis == 1 else weight.data.t()
    metric = w.abs().float() * mean_sq.to(w.device).sqrt().unsqueeze(0)
    k = int(w.shape[1] * sparsity)
    if k == 0:
        return
    idx = torch.sort(metric, dim=1, stable=True).indices[:, :k]
    w.scatter_(1, idx, 0)


def layerwise_wanda(
    model: torch.nn.Module,
    sites: dict[str, Site],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    sparsity: float,
    label: str,
    on_batch: Callable[[], None] | None = None,
) -> ActivationStats:
    """Sums of x^2 per input channel of each Linear in each block, blocks pruned as they go."""
    prefix, layers = decoder_layers(model)
    states = _capture_block_inputs(model, layers, batches, device)
    total = ActivationStats()
    for i, block in enumerate(layers):
        here = {n: s for n, s in sites.items() if n.startswith(f"{prefix}.{i}.")}
        mods = {n: site_module(model, s) for n, s in here.items()}
        with torch.no_grad():
            with ActivationCollector(mods, ("sq",), label) as col:
                for (hidden, kwargs), (_ids, mask) in zip(states, batches):
                    col.begin_batch(mask.to(hidden.device))
                    block(hidden, **kwargs)
                    col.end_batch()
                stats = col.result()
            for n, s in here.items():
                w = mods[n].weight
                stats.col_sq[n] = column_sq_norms(w, s.axis)  # scores use the unpruned weights
                mean_sq = torch.from_numpy(stats.mean("sq", n))
                wanda_prune_(w, mean_sq, sparsity, s.axis)
            nxt = []
            for hidden, kwargs in states:
                out = block(hidden, **kwargs)
                nxt.append((out[0] if isinstance(out, (tuple, list)) else out, kwargs))
            states = nxt
        total = total.add(stats) if total.order else stats
        if on_batch:
            on_batch()
    return total
