"""I/O layer timing and peak memory: ModelDir.read vs safe_open, ShardWriter vs save_file.

    python benchmarks/io_bench.py [--mb 512] [--tensor-mb 16] [--threads 4]

Each measurement runs in a fresh subprocess so its peak RSS (VmHWM) is its own;
importing torch alone is about 220 MB of it.
Reads stream every tensor once and drop it, as apply does. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _build(d: Path, mb: int, tensor_mb: int) -> None:
    import torch
    from safetensors.torch import save_file

    n = max(1, mb // tensor_mb)
    rows = tensor_mb * (1 << 20) // (2 * 1024)
    per_shard = max(1, n // 4)
    d.mkdir(parents=True, exist_ok=True)
    for s in range(0, n, per_shard):
        part = {f"t{i:04d}": torch.randn(rows, 1024).to(torch.bfloat16)
                for i in range(s, min(n, s + per_shard))}
        save_file(part, d / f"part-{s:04d}.safetensors", metadata={"format": "pt"})


def _vm_hwm_kb() -> float:
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak over
    # fork+exec on Linux.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(kind: str, src: str, dst: str, threads: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from mergeplan.io.modeldir import ModelDir

    m = ModelDir.open(src)
    names = m.tensor_names()
    total = sum(m.info(n).nbytes for n in names)
    t0 = time.perf_counter()
    if kind == "modeldir_read":
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(lambda n: m.read(n).sum().item(), names):
                pass
    elif kind == "safe_open_read":
        from safetensors import safe_open

        for f in m.shard_files:
            with safe_open(Path(src) / f, framework="pt") as sf:
                for k in sf.keys():
                    sf.get_tensor(k).sum().item()
    elif kind == "shard_writer":
        from mergeplan.io.shards import plan_shards
        from mergeplan.io.writer import ShardWriter, write_index

        layouts = plan_shards([(n, m.info(n).dtype, m.info(n).shape) for n in names], "200MB")
        for lay in layouts:
            with ShardWriter(Path(dst) / lay.file, lay) as w, ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda t: w.write(t.name, m.read(t.name)), lay.tensors))
        write_index(dst, layouts)
    elif kind == "save_file":
        from safetensors.torch import save_file

        # What a naive writer does: gather a whole shard in memory, then save.
        for f in m.shard_files:
            part = {n: m.read(n) for n in names if m.info(n).file == f}
            save_file(part, Path(dst) / f, metadata={"format": "pt"})
            del part
    secs = time.perf_counter() - t0
    peak_mb = _vm_hwm_kb() / 1024
    return {"kind": kind, "seconds": round(secs, 3), "MB_per_s": round(total / secs / 2**20),
            "peak_rss_MB": round(peak_mb)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--tensor-mb", type=int, default=16)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--child", nargs=3)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(a.child[0], a.child[1], a.child[2], a.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        _build(src, a.mb, a.tensor_mb)
        print(f"model: {a.mb} MB in {a.tensor_mb} MB bf16 tensors; threads={a.threads}")
        for kind in ["modeldir_read", "safe_open_read", "shard_writer", "save_file"]:
            dst = Path(tmp) / kind
            dst.mkdir()
            out = subprocess.run(
                [sys.executable, __file__, "--threads", str(a.threads), "--child", kind, str(src), str(dst)],
                check=True, capture_output=True, text=True,
            ).stdout
            print(out.strip())


if __name__ == "__main__":
    main()
