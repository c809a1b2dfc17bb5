"""Fuzz the plan readers: mutated, re-signed plans through decode, validate, show and diff.

    python scripts/fuzz_plans.py [--seed 0] [--count 2000] [--minutes M] [--no-cli] [--show-crashes N]

Each mutated plan (tests/plan_mutate.py) goes through the library calls (decode_plan,
check_plan, report.print_plan, report.plan_json + json.dumps, diff_plans + print_diff
both ways) and, unless --no-cli, through `mergeplan validate`, `show`, `show --json`
and `diff` run in-process. Prints how often each outcome happened per stage:
  ok / refused (a one-line MergeplanError) / problems (validate listed some)
  crash:<Exception>@<file:line>  (a traceback: always a bug)
  control-chars  (raw control characters reached the rendered output)
Exit status 1 if any crash or control character was seen.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from plan_factory import make_full_plan  # noqa: E402
from plan_mutate import CONTROL, crash_kind, mutate_plan, through_readers  # noqa: E402

from mergeplan.plan.codec import decode_plan, encode_plan  # noqa: E402


def run_cli(args: list[str]) -> str:
    from mergeplan.cli import main

    old = sys.argv
    sys.argv = ["mergeplan", *args]
    so, se = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001 - escaped main(): a traceback for the user
        return crash_kind(e)
    finally:
        sys.argv = old
    text = so.getvalue() + se.getvalue()
    if "Traceback" in text:
        return "crash:traceback-printed"
    if CONTROL.search(text):
        return "control-chars"
    return f"exit {code}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--minutes", type=float, default=None, help="stop after this long even if --count is not reached")
    ap.add_argument("--no-cli", action="store_true", help="library calls only (faster)")
    ap.add_argument("--show-crashes", type=int, default=0, help="print the first N crash tracebacks' kinds with their mutation")
    args = ap.parse_args()

    os.environ.pop("MERGEPLAN_TRACEBACK", None)
    # No colour codes from the CLI's consoles (made when mergeplan.cli is first imported),
    # or they would count as control characters when this runs in a terminal.
    os.environ.pop("FORCE_COLOR", None)
    os.environ["TERM"] = "dumb"
    orig_plan = make_full_plan()
    data = encode_plan(orig_plan)
    orig = decode_plan(data)
    rng = random.Random(args.seed)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_mutation: collections.Counter = collections.Counter()
    examples: list[str] = []
    deadline = time.monotonic() + 60 * args.minutes if args.minutes else None
    t0 = time.perf_counter()
    n = bad_plans = 0
    with tempfile.TemporaryDirectory() as tmp:
        a_path = Path(tmp) / "a.plan"
        a_path.write_bytes(data)
        b_path = Path(tmp) / "b.plan"
        for n in range(1, args.count + 1):
            mutated, kind = mutate_plan(data, rng)
            outcome = through_readers(mutated, orig)
            if not args.no_cli:
                b_path.write_bytes(mutated)
                outcome["cli-validate"] = run_cli(["validate", str(b_path)])
                outcome["cli-show"] = run_cli(["show", "--tensors", str(b_path)])
                outcome["cli-show-json"] = run_cli(["show", "--json", str(b_path)])
                outcome["cli-diff"] = run_cli(["diff", str(a_path), str(b_path)])
            bad_plan = False
            for stage, result in outcome.items():
                counts[stage][result] += 1
                if result.startswith(("crash", "control")):
                    by_mutation[kind] += 1
                    bad_plan = True
                    if len(examples) < args.show_crashes:
                        examples.append(f"{stage}: {result} after {kind}")
            bad_plans += bad_plan
            if deadline is not None and time.monotonic() > deadline:
                break
    dt = time.perf_counter() - t0
    print(f"{n} mutated plans (seed {args.seed}) in {dt:.1f}s")
    bad_total = 0
    kinds = set()
    for stage, c in counts.items():
        print(f"  {stage}:")
        for result, k in c.most_common():
            print(f"    {k:6d}  {result}")
            if result.startswith(("crash", "control")):
                bad_total += k
                kinds.add(result)
    print(f"crashes/control-char outputs: {bad_total} ({len(kinds)} kinds), in {bad_plans} of {n} plans")
    if by_mutation:
        print("  by mutation: " + ", ".join(f"{k}={v}" for k, v in by_mutation.most_common()))
    for e in examples:
        print("  " + e)
    return 1 if bad_total else 0


if __name__ == "__main__":
    sys.exit(main())
