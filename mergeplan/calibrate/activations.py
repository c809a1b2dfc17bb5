"""Per-input-channel activation statistics from forward pre-hooks.

For each hooked module the collector sums, over every non-padding token, |x_j| ("abs",
AIM's statistic) and/or x_j^2 ("sq", Wanda/LEWIS's), in float32 on the module's device.
Sums and token counts are kept apart so statistics of several passes add up exactly.

Cost: modules fed the same tensor (q/k/v, gate/up) share one reduction, and the reduction
is a GEMV with the attention mask as weights (padding weighs 0), the cheapest column sum
there is. Half-precision inputs are upcast first so the sums are float32 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from mergeplan.calibrate.experts import ExpertInputs, call_inputs, down_inputs, routed
from mergeplan.errors import MergeplanError

KINDS = ("abs", "sq")


@dataclass
class ActivationStats:
    """Sums over tokens per input channel (float32 numpy, on the host) and token counts."""

    sums: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # kind -> module -> [C]
    count: dict[str, int] = field(default_factory=dict)  # module -> tokens seen
    order: list[str] = field(default_factory=list)  # modules in forward order
    col_sq: dict[str, np.ndarray] = field(default_factory=dict)  # module -> sum_out W^2 per input column
    notes: list[str] = field(default_factory=list)

    def mean(self, kind: str, module: str) -> np.ndarray:
        return self.sums[kind][module] / max(self.count[module], 1)

    def has(self, module: str) -> bool:
        """Whether any token reached the module (an expert the router never chose: no)."""
        return self.count.get(module, 0) > 0 and any(module in v for v in self.sums.values())

    def add(self, other: "ActivationStats") -> "ActivationStats":
        """Pool the tokens of two passes (same modules)."""
        order = self.order + [m for m in other.order if m not in self.order]
        out = ActivationStats(order=order, notes=self.notes + other.notes)
        for kind in set(self.sums) | set(other.sums):
            a, b = self.sums.get(kind, {}), other.sums.get(kind, {})
            out.sums[kind] = {m: a.get(m, 0) + b.get(m, 0) for m in set(a) | set(b)}
        for m in set(self.count) | set(other.count):
            out.count[m] = self.count.get(m, 0) + other.count.get(m, 0)
        out.col_sq = {**other.col_sq, **self.col_sq}
        return out


class ActivationCollector:
    """Forward pre-hooks on `modules`; call begin_batch(mask) before each forward, end_batch after.

    Raises MergeplanError naming the module where non-finite activations first appear
    (in forward order) and, at result(), the modules whose hook never fired.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], kinds: Iterable[str], label: str):
        self.modules = modules
        self.kinds = tuple(k for k in KINDS if k in set(kinds))
        if not self.kinds:
            raise ValueError("ActivationCollector needs at least one statistic kind")
        self.label = label
        self._acc: dict[str, dict[str, torch.Tensor]] = {k: {} for k in self.kinds}
        self._count: dict[str, int] = {n: 0 for n in modules}
        self._order: list[str] = []
        self._handles: list = []
        self._misaligned: set[str] = set()
        self._mask: torch.Tensor | None = None
        self._mask2d: torch.Tensor | None = None
        self._valid = 0
        self._w: dict[tuple[torch.device, int], torch.Tensor] = {}
        self._scratch: dict[torch.device, torch.Tensor] = {}
        self._last: tuple[torch.Tensor, dict] | None = None
        self._batch = -1

    def __enter__(self) -> "ActivationCollector":
        experts: dict[int, tuple[torch.nn.Module, dict[tuple[int, str], str]]] = {}
        for name, mod in self.modules.items():
            if isinstance(mod, ExpertInputs):
                experts.setdefault(id(mod.experts), (mod.experts, {}))[1][(mod.index, mod.proj)] = name
            else:
                self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        for owner, names in experts.values():
            self._handles.append(owner.register_forward_pre_hook(self._expert_hook(owner, names), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None
        self._scratch.clear()

    def begin_batch(self, mask: torch.Tensor) -> None:
        self._batch += 1
        self._mask2d = mask.bool() if mask.dim() == 2 else None
        self._mask = mask.reshape(-1).bool()
        self._valid = int(self._mask.sum())
        self._w = {}
        self._last = None

    def _weights(self, device: torch.device, n: int) -> torch.Tensor:
        """Per-row weights: the attention mask as float32 (1 token, 0 padding) on `device`."""
        key = (device, n)
        if key not in self._w:
            if self._mask is not None and n == self._mask.numel():
                self._w[key] = self._mask.to(device=device, dtype=torch.float32)
            else:
                self._w[key] = torch.ones(n, dtype=torch.float32, device=device)
        return self._w[key]

    def _hook(self, name: str):
        def pre_hook(module: torch.nn.Module, args: tuple) -> None:
            if not args or not torch.is_tensor(args[0]):
                return
            self._add(name, args[0])

        return pre_hook

    def _expert_hook(self, owner: torch.nn.Module, names: dict[tuple[int, str], str]):
        """One hook per fused experts module: per expert, the rows routed to it (and, for its
        down projection, the activations it computes from them)."""
        indices = sorted({e for e, _ in names})

        def pre_hook(_module, args: tuple, kwargs: dict) -> None:
            hidden, top_k = call_inputs(args, kwargs)
            if hidden is None or top_k is None:
                return
            x = hidden.detach().reshape(-1, hidden.shape[-1])
            for e in indices:
                rows = routed(top_k.reshape(x.shape[0], -1), e)
                if rows.numel() == 0:
                    continue
                xe = x[rows]
                for proj in ("gate", "up"):
                    if (e, proj) in names:
                        self._add(names[(e, proj)], xe, rows)
                if (e, "down") in names:
                    with torch.no_grad():
                        self._add(names[(e, "down")], down_inputs(owner, e, xe).detach(), rows)

        return pre_hook

    def _row_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """Weights (1 token, 0 padding) for the rows of x.reshape(-1, C) when x has a row per
        token and head: [B, S, ..., C] (Qwen3's q_norm) or [B, H, S, C] (Gemma3's)."""
        m = self._mask2d
        if m is None or x.dim() < 3:
            return None
        B, S = m.shape
        lead = tuple(x.shape[:-1])
        token_major = lead[:2] == (B, S)
        head_major = len(lead) == 3 and lead[0] == B and lead[2] == S
        if token_major == head_major:  # neither, or ambiguous (heads == seq_len)
            return None
        view = m.view(B, S, *([1] * (len(lead) - 2))) if token_major else m.view(B, 1, S)
        w = view.expand(lead).reshape(-1).to(device=x.device, dtype=torch.float32)
        return w, int(self._valid * (w.numel() // max(self._mask.numel(), 1)))

    def _reduce(self, name: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> dict:
        x2 = x.detach().reshape(-1, x.shape[-1])
        n = x2.shape[0]
        if rows is not None and self._mask is not None:
            # An expert's rows: the tokens the router sent it, padding weighing 0 as elsewhere.
            w = self._mask.to(x2.device)[rows].to(torch.float32)
            count = int(w.sum())
        elif self._mask is not None and n == self._mask.numel():
            w = self._weights(x2.device, n)
            count = self._valid
        elif (per_head := self._row_weights(x)) is not None:
            w, count = per_head
        else:
            # Rows that are not one per token (e.g. a module fed a selection of tokens):
            # nothing tells padding apart, so every row counts; the plan notes it.
            self._misaligned.add(name)
            w = self._weights(x2.device, n)
            count = n
        # Column sums as a mask-weighted GEMV: padding rows get weight 0, and a GEMV beats a
        # strided reduction over dim 0 by an order of magnitude on CPU. |x| and x^2 go into a
        # reused float32 scratch buffer: a fresh activation-sized tensor per hook costs page
        # faults that, on CPU, weigh as much as the reduction itself.
        buf = self._scratch_for(x2)
        res: dict = {"n": count}
        same = x2.dtype == torch.float32
        if "abs" in self.kinds:
            if same:
                torch.abs(x2, out=buf)
            else:
                buf.copy_(x2).abs_()
            res["abs"] = w @ buf
        if "sq" in self.kinds:
            if "abs" in self.kinds:
                buf.square_()  # |x|^2 = x^2, without reading x again
            elif same:
                torch.mul(x2, x2, out=buf)
            else:
                buf.copy_(x2).square_()
            res["sq"] = w @ buf
        return res

    def _scratch_for(self, x2: torch.Tensor) -> torch.Tensor:
        need = x2.numel()
        cur = self._scratch.get(x2.device)
        if cur is None or cur.numel() < need:
            cur = torch.empty(need, dtype=torch.float32, device=x2.device)
            self._scratch[x2.device] = cur
        return cur[:need].view(x2.shape)

    def _add(self, name: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        if self._last is not None and self._last[0] is x:
            res = self._last[1]
        else:
            res = self._reduce(name, x, rows)
            self._last = (x, res)
        if self._count[name] == 0 and name not in self._order:
            self._order.append(name)
        for k in self.kinds:
            acc = self._acc[k]
            if name in acc:
                acc[name] += res[k]
            else:
                acc[name] = res[k].clone()
        self._count[name] += res["n"]

    def end_batch(self) -> None:
        self._last = None
        names = [n for n in self._order if n in self._acc[self.kinds[0]]]
        if not names:
            return
        flags = [torch.isfinite(self._acc[k][n]).all() for n in names for k in self.kinds]
        devices = {f.device for f in flags}
        ok = torch.stack(flags if len(devices) == 1 else [f.cpu() for f in flags]).cpu()
        if bool(ok.all()):
            return
        first = names[int(torch.nonzero(~ok)[0]) // len(self.kinds)]
        raise MergeplanError(
            f"non-finite activations (NaN/inf) entering {first} of model {self.label!r} in batch "
            f"{self._batch}: the computation before this module overflowed or its weights hold NaN; "
            "check that model's weights, or calibrate in float32 (calibration.dtype: float32)"
        )

    def result(self) -> ActivationStats:
        silent = [n for n in self.modules if self._count[n] == 0 and n not in self._order]
        # An expert the router never chose on this data is a fact about the data, not an error:
        # its statistics are absent (ActivationStats.has) and the guides leave it as the recipe says.
        idle = [n for n in silent if isinstance(self.modules[n], ExpertInputs)]
        silent = [n for n in silent if n not in idle]
        if silent:
            shown = ", ".join(silent[:5]) + (f" and {len(silent) - 5} more" if len(silent) > 5 else "")
            raise MergeplanError(
                f"model {self.label!r}: module(s) {shown} received no input during calibration (forward hook "
                "never fired); the model's forward does not use them, or (mixture of experts) no token was "
                "routed to them: give more varied calibration data, or leave this guide out for this model"
            )
        stats = ActivationStats(order=list(self._order))
        for k in self.kinds:
            stats.sums[k] = {n: t.detach().to("cpu", torch.float32).numpy() for n, t in self._acc[k].items()}
        stats.count = dict(self._count)
        if idle:
            shown = ", ".join(idle[:5]) + (f" and {len(idle) - 5} more" if len(idle) > 5 else "")
            stats.notes.append(
                f"{self.label}: no calibration token was routed to {len(idle)} expert projection(s) ({shown}); "
                "guides leave their tensors as the recipe says"
            )
        if self._misaligned:
            stats.notes.append(
                f"{self.label}: inputs of {', '.join(sorted(self._misaligned))} are not one row per token; "
                "their statistics include padded positions"
            )
        return stats


def column_sq_norms(weight: torch.Tensor, axis: int) -> np.ndarray:
    """sum over outputs of W^2, per input channel, in float32 without a float32 copy of W."""
    out_dim = 0 if axis == 1 else 1
    v = torch.linalg.vector_norm(weight.detach(), ord=2, dim=out_dim, dtype=torch.float32).square_()
    return v.to("cpu").numpy()


def first_nonfinite_module(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> str | None:
    """Re-run one batch and name the first module (in execution order) whose output is not finite."""
    found: list[str] = []
    handles = []

    def hook(name: str):
        def check(_mod, _args, out) -> None:
            t = out[0] if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]) else out
            if not found and torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                found.append(name)

        return check

    for name, mod in model.named_modules():
        if name and not list(mod.children()):  # leaves: the innermost module that produced it
            handles.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None
