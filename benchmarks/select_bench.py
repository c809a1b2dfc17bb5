"""topk_mask vs a full torch.sort and torch.kthvalue on one 11M-element float32 tensor.

    python benchmarks/select_bench.py [--numel 11010048] [--density 0.1] [--repeat 5]
                                      [--device cpu] [--threads N]

All timings are taken in this one process on the same tensor; the candidates run in turn
each round and the medians are compared, so the ratios are what to compare across
machines. topk_mask is checked to select exactly k entries first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mergeplan.methods.select import topk_mask


def interleaved_medians(fns: dict, repeat: int, device: torch.device) -> dict[str, float]:
    """Median seconds per candidate, running the candidates in turn each round so that
    load from other processes hits all of them alike (the ratios stay fair)."""
    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=4096 * 2688)  # ~11M: one 7B-class MLP slice
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    k = max(1, int(args.density * args.numel))
    cases = {
        "float32 randn": torch.randn(args.numel, generator=g) * 1e-3,
        "bf16-derived (many ties)": (torch.randn(args.numel, generator=g) * 1e-3).to(torch.bfloat16).float(),
    }
    print(f"numel={args.numel} k={k} device={device} threads={torch.get_num_threads()}")
    for label, x in cases.items():
        x = x.to(device)
        a = x.abs()
        assert int(topk_mask(x, k).sum()) == k
        t = interleaved_medians(
            {
                "topk_mask": lambda: topk_mask(x, k),
                "sort": lambda: torch.sort(a, descending=True),
                "kthvalue": lambda: torch.kthvalue(a, args.numel - k + 1),
            },
            args.repeat,
            device,
        )
        print(
            f"{label:26s} topk_mask {t['topk_mask'] * 1e3:7.1f} ms | sort {t['sort'] * 1e3:7.1f} ms "
            f"| kthvalue {t['kthvalue'] * 1e3:7.1f} ms | topk/sort {t['topk_mask'] / t['sort']:.3f} "
            f"| topk/kthvalue {t['topk_mask'] / t['kthvalue']:.3f}"
        )


if __name__ == "__main__":
    main()
