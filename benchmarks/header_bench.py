"""read_header on near-cap (~90 MB) headers: wall time and peak/retained RSS.

    python benchmarks/header_bench.py [--mb 90] [--case all|model|tiny|deep|nonascii]
                                      [--header-module FILE]

Cases (each one file, built in a temp dir; the data region is a sparse hole, so a
file "holding" several GB of tensors takes no disk):
  model     a valid header like a big checkpoint's: ~780k tensors with real-looking names
            and shapes, compact JSON as `save_file` writes it (the memory figure to watch);
  tiny      the same size filled with the most entries possible (short names, 1-byte
            tensors): the most Python objects per header byte;
  deep      hostile: the whole header is sticks of brackets nested --depth deep; refused by
            the pre-scan, so this is the cost of refusing;
  nonascii  `model` with one non-ASCII name, so the decoded str takes 4 bytes a char.

Each read runs in a fresh subprocess so VmHWM (peak RSS) is its own; importing torch
(mergeplan.io.tensors does) is a couple of hundred MB of the baseline, so compare the
deltas ("retained" is RSS after the call, with the parsed header still alive).
`--header-module` loads read_header from another file, e.g. the version before a change:
    git show <rev>:mergeplan/io/header.py > /tmp/old_header.py
and pass that path. Not part of the test run.

Figures when read_header was hardened (2 vCPU VM, Python 3.11, deltas over a 219 MB base):
  before: model +852 MB peak, +737 retained, 6.1 s; tiny +1213 peak, +1098 retained, 9.7 s
  after:  model +288 MB peak, +202 retained, 4.7 s; tiny  +352 peak,  +266 retained, 7.0 s
          deep (refused) +259 peak, 0.5-1 s; nonascii +545 peak (the 4-byte-per-char str)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_kb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


def _write(path: Path, text: bytes, data_size: int) -> None:
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + data_size)  # sparse: no data blocks are written


def _build_model(path: Path, mb: float, nonascii: bool = False) -> int:
    parts = ['{"__metadata__":{"format":"pt"}']
    shapes = [((4096,), 2), ((64, 64), 2), ((8, 32, 16), 2), ((1024, 4), 4), ((11, 13), 4)]
    kinds = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.down_proj.weight",
             "mlp.gate_proj.weight", "input_layernorm.weight"]
    offset, size, i = 0, len(parts[0]), 0
    budget = int(mb * 1e6) - 64
    while True:
        shape, itemsize = shapes[i % len(shapes)]
        dtype = "BF16" if itemsize == 2 else "F32"
        n = itemsize
        for d in shape:
            n *= d
        name = f"model.layers.{i // 5}.{kinds[i % 5]}"
        if nonascii and i == 7:
            name += ".\u00e9\U0001f600"
        item = (f',{json.dumps(name, ensure_ascii=False)}:{{"dtype":"{dtype}","shape":'
                f'[{",".join(map(str, shape))}],"data_offsets":[{offset},{offset + n}]}}')
        if size + len(item.encode()) > budget:
            break
        parts.append(item)
        size += len(item.encode())
        offset += n
        i += 1
    _write(path, ("".join(parts) + "}").encode(), offset)
    return i


def _build_tiny(path: Path, mb: float) -> int:
    parts, size, i = ["{"], 1, 0
    budget = int(mb * 1e6) - 64
    while True:
        item = f'{"," if i else ""}"{i:x}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}'
        if size + len(item) > budget:
            break
        parts.append(item)
        size += len(item)
        i += 1
    _write(path, ("".join(parts) + "}").encode(), i)
    return i


def _build_deep(path: Path, mb: float, depth: int) -> int:
    stick = b"[" * depth + b"]" * depth
    count = int(mb * 1e6) // len(stick)
    _write(path, b'{"a":' + b",".join([stick] * count)[: int(mb * 1e6)] + b"}", 0)
    return count


def _child(path: str, module: str | None) -> dict:
    if module:
        spec = importlib.util.spec_from_file_location("header_under_test", module)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up by name
        spec.loader.exec_module(mod)
    else:
        import mergeplan.io.header as mod
    from mergeplan.errors import MergeplanError

    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    try:
        hdr = mod.read_header(path)
        outcome = f"parsed {len(hdr.entries)} entries"
    except MergeplanError as e:
        hdr, outcome = None, f"refused: {str(e)[:110]}"
    secs = time.perf_counter() - t0
    return {"outcome": outcome, "secs": secs, "rss_before_mb": before / 1024,
            "peak_mb": _status_kb("VmHWM") / 1024, "retained_mb": _status_kb("VmRSS") / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=90.0, help="header size in MB (cap is 100)")
    ap.add_argument("--case", choices=["model", "tiny", "deep", "nonascii", "all"], default="all")
    ap.add_argument("--depth", type=int, default=64, help="nesting of the `deep` sticks")
    ap.add_argument("--header-module", help="read_header from this file instead of mergeplan")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, module = args.child
        print(json.dumps(_child(path, module or None)))
        return

    cases = ["model", "tiny", "deep", "nonascii"] if args.case == "all" else [args.case]
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            p = Path(tmp) / f"{case}.safetensors"
            if case == "model":
                count = _build_model(p, args.mb)
            elif case == "nonascii":
                count = _build_model(p, args.mb, nonascii=True)
            elif case == "tiny":
                count = _build_tiny(p, args.mb)
            else:
                count = _build_deep(p, args.mb, args.depth)
            with open(p, "rb") as f:
                hdr_mb = struct.unpack("<Q", f.read(8))[0] / 1e6
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(p), args.header_module or ""],
                capture_output=True, text=True, env=dict(os.environ),
            )
            if out.returncode != 0:
                print(f"{case}: child failed (rc {out.returncode}): {out.stderr.strip()[-400:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{case:9s} header {hdr_mb:6.1f} MB, {count} items: {r['secs']:6.2f} s, "
                f"RSS before {r['rss_before_mb']:6.0f} MB, peak {r['peak_mb']:6.0f} MB "
                f"(+{r['peak_mb'] - r['rss_before_mb']:.0f}), retained "
                f"+{r['retained_mb'] - r['rss_before_mb']:.0f} MB; {r['outcome']}"
            )


if __name__ == "__main__":
    main()
