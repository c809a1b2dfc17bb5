"""Command line: plan, apply, show, validate, diff, eval, review.

Known errors become one line on stderr and a non-zero exit; set MERGEPLAN_TRACEBACK=1 to
see the traceback. Progress goes to stderr so stdout stays clean for --json.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import __version__
from .errors import MergeplanError
from .safetext import markup as _markup

app = typer.Typer(
    name="mergeplan",
    help="Plan, review and apply reproducible, data-guided merges of fine-tuned LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: typer's rich panels print a flag as `--json <bool>`, which reads as
    # if it took a value (`--json true` is refused). -h as well as --help, on every command.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
# Piped output (files, grep, CI logs) gets room for whole tensor names.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _version(value: bool) -> None:
    if value:
        print(f"mergeplan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    pass


def _parse_remap(items: list[str] | None) -> dict[str, str]:
    remap = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise MergeplanError(f"--model {item!r}: expected NAME=PATH, e.g. --model math=/data/math-7b")
        remap[name] = path
    return remap


def _device(name: str):
    from .devices import pick_device

    return pick_device(name)


@app.command()
def plan(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML (mergekit config plus mergeplan's keys).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Plan file to write.")],
    model: Annotated[Optional[list[str]], typer.Option("--model", help="NAME=PATH: where a recipe model lives on this machine.")] = None,
    device: Annotated[str, typer.Option(help="Calibration device: auto, cpu, cuda, cuda:N, mps.")] = "auto",
    threads: Annotated[int, typer.Option(help="Worker threads for mask computation.")] = max(1, os.cpu_count() or 1),
    fast_hash: Annotated[bool, typer.Option("--fast-hash", hidden=True, help="Ignored: tensor digests are computed while planning reads the weights.")] = False,
    full_hash: Annotated[bool, typer.Option("--full-hash", help="Also record each shard's whole-file sha256 (reads every shard once more).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite PLAN if it exists (its edit log is lost).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    no_tune: Annotated[bool, typer.Option("--no-tune", help="Ignore the recipe's tune: section; plan the recipe as written.")] = False,
) -> None:
    """Read a recipe, analyse the inputs (and calibrate, for guided recipes), write a plan.
    With a `tune:` section: calibrate once, score candidates on held-out data, write the best."""
    from .planner import PlanOptions, build_plan
    from .plan.codec import write_plan
    from .plan.identity import decision_digest
    from .progress import StageProgress
    from .recipe import load_recipe

    _check_plan_output(output, force)  # before minutes of calibration, not after
    rec = load_recipe(recipe)
    for note in rec.notes:
        err.print(f"note: {_markup(note)}")
    if fast_hash:
        err.print("note: --fast-hash is no longer needed: tensor digests are computed while planning reads the weights")
    t0 = time.perf_counter()
    if rec.tune is not None and not no_tune:
        p = _tuned_plan(rec, PlanOptions(device=device, threads=threads, full_hash=full_hash, quiet=quiet,
                                         remap=_parse_remap(model)), quiet)
    else:
        with StageProgress(err, quiet) as prog:
            p = build_plan(rec, PlanOptions(device=device, threads=threads, full_hash=full_hash, quiet=quiet,
                                            remap=_parse_remap(model), progress=prog.update))
    _check_plan_output(output, force)  # it may have appeared while planning
    write_plan(p, output)
    if not quiet:
        err.print(f"wrote {_markup(output)} ({output.stat().st_size:,} bytes, {len(p.tensors)} tensors, "
                  f"{len(p.models)} models) in {time.perf_counter() - t0:.1f}s")
    out.print(decision_digest(p))


def _tuned_plan(rec, opts, quiet: bool):
    from .tune.report import candidates_table, verdict_lines
    from .tune.search import tune_plan

    plan = tune_plan(rec, opts, say=(lambda s: None) if quiet else (lambda s: err.print(_markup(s))))
    if not quiet:
        err.print(candidates_table(plan.tuning))
        for line in verdict_lines(plan.tuning):
            err.print(line, emoji=False)
    return plan


@app.command()
def pick(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN", help="A plan made by a `tune:` search.")],
    candidate: Annotated[int, typer.Argument(metavar="N", help="The candidate's number (# in the tuning table).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Plan file to write.")],
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="The recipe the search ran (default: where the plan says it was).")] = None,
    model: Annotated[Optional[list[str]], typer.Option("--model", help="NAME=PATH: where a plan model lives on this machine.")] = None,
    device: Annotated[str, typer.Option(help="Calibration device: auto, cpu, cuda, cuda:N, mps.")] = "auto",
    threads: Annotated[int, typer.Option(help="Worker threads for mask computation.")] = max(1, os.cpu_count() or 1),
    force: Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists.")] = False,
) -> None:
    """Re-plan a tuned plan with another candidate's values (same recipe file, unchanged inputs)."""
    from .plan.codec import read_plan, write_plan
    from .plan.identity import decision_digest
    from .tune.pick import pick as pick_candidate

    _check_plan_output(output, force)
    p = pick_candidate(read_plan(plan_file), candidate, recipe, _parse_remap(model), str(plan_file), device, threads)
    _check_plan_output(output, force)
    write_plan(p, output)
    err.print(f"wrote {_markup(output)}: candidate #{candidate} of {_markup(plan_file)}")
    out.print(decision_digest(p))


def _check_plan_output(output: Path, force: bool) -> None:
    if output.is_dir():
        raise MergeplanError(f"{output} is a directory; give the plan file's path, e.g. -o {output}/merge.plan")
    if output.exists() and not force:
        raise MergeplanError(f"{output} already exists (a plan's hand edits and edit log would be lost); "
                             "pass --force to overwrite it or choose another name")


@app.command()
def apply(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan file from `mergeplan plan`.")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Output directory (must not exist unless --force).")],
    model: Annotated[Optional[list[str]], typer.Option("--model", help="NAME=PATH: where a plan model lives on this machine.")] = None,
    threads: Annotated[int, typer.Option(help="Tensors merged in parallel (each on one core).")] = max(1, os.cpu_count() or 1),
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if it exists.")] = False,
    full_verify: Annotated[bool, typer.Option("--full-verify", help="Check every input byte before merging (a second read); by default bytes are checked as they are read, before OUT_DIR appears.")] = False,
    device: Annotated[str, typer.Option(help="Compute device: cpu (default), cuda, cuda:N, mps, auto.")] = "cpu",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Merge the inputs exactly as the plan says; write a Hugging Face model directory."""
    from .apply import ApplyOptions, apply_plan
    from .plan.codec import read_plan
    from .progress import ApplyProgress

    p = read_plan(plan_file)
    t0 = time.perf_counter()
    with ApplyProgress(err, quiet, total=len(p.tensors)) as prog:
        res = apply_plan(p, out_dir, ApplyOptions(threads=threads, force=force, full_verify=full_verify,
                                                  remap=_parse_remap(model), device=_device(device),
                                                  progress=prog.update, plan_path=str(plan_file),
                                                  note=lambda s: err.print(f"note: {_markup(s)}")))
    if not quiet:
        dt = time.perf_counter() - t0
        err.print(f"wrote {_markup(res.out_dir)} ({res.tensors} tensors, {len(res.files)} files) "
                  f"in {dt:.1f}s, {res.bytes_read / 1e9 / max(dt, 1e-9):.2f} GB/s read")


@app.command()
def show(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")] = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="Also list every tensor.")] = False,
) -> None:
    """Models, method, per-layer densities and coefficients, mask statistics, guide statistics."""
    from .plan.codec import read_plan_with_digest
    from .report import plan_json, print_plan

    p, digest = read_plan_with_digest(plan_file)  # the digest checked while reading: not hashed twice
    if as_json:
        import json

        sys.stdout.write(json.dumps(plan_json(p, digest), indent=2, sort_keys=True) + "\n")
    else:
        print_plan(out, p, plan_file, tensors=tensors, digest=digest)


@app.command()
def validate(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN")],
    inputs: Annotated[bool, typer.Option("--inputs", help="Also check the input models on disk against the fingerprints.")] = False,
    full: Annotated[bool, typer.Option("--full", help="With --inputs: full sha256 of every shard.")] = False,
    model: Annotated[Optional[list[str]], typer.Option("--model", help="NAME=PATH remap, as for apply.")] = None,
) -> None:
    """Check a plan's integrity (and, with --inputs, that the inputs match it)."""
    from .plan.codec import read_plan
    from .validate import check_inputs, check_plan

    from .safetext import markup

    p = read_plan(plan_file)  # digest and version are checked here
    problems = check_plan(p)
    if problems:
        for pr in problems:  # they quote the plan's own strings
            err.print(f"[red]error[/]: {markup(pr)}", emoji=False)
        raise typer.Exit(1)
    out.print(f"plan ok: {len(p.tensors)} tensors, {len(p.models)} models")
    if inputs:
        for line in check_inputs(p, _parse_remap(model), full=full, plan_path=str(plan_file)):
            out.print(markup(line), emoji=False)


@app.command()
def diff(
    plan_a: Annotated[Path, typer.Argument(metavar="PLAN_A")],
    plan_b: Annotated[Path, typer.Argument(metavar="PLAN_B")],
    tensors: Annotated[bool, typer.Option("--tensors", help="Also list every change, tensor by tensor.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Every change as JSON on stdout.")] = False,
) -> None:
    """What changed between two plans: per layer and component, then per field. Exit 1 when they differ."""
    from .plan.codec import read_plan
    from .plan.diff import diff_plans
    from .report import print_diff

    rows = diff_plans(read_plan(plan_a), read_plan(plan_b))
    if as_json:
        import json

        sys.stdout.write(json.dumps([r.__dict__ for r in rows], indent=2, default=str) + "\n")
    else:
        # The terminal's width, or COLUMNS (80 without either) when piped: the summary is
        # laid out for it, never folded across lines.
        print_diff(Console(highlight=False), rows, plan_a, plan_b, tensors=tensors)
    raise typer.Exit(1 if rows else 0)


@app.command(name="eval")
def eval_(
    targets: Annotated[list[str], typer.Argument(metavar="MODEL_DIR|PLAN...", help="Merged model directories, or plans (merged in memory, as apply would).")],
    data: Annotated[list[str], typer.Option("--data", help="NAME=PATH per task, comma-separated or repeated; PATH as for calibration.data (text, JSONL, parquet, datasets dir, hf:NAME).")],
    model: Annotated[Optional[list[str]], typer.Option("--model", help="NAME=PATH: where a plan model lives, or another fine-tune to score.")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="The base model directory (when no plan names it).")] = None,
    no_baselines: Annotated[bool, typer.Option("--no-baselines", help="Score only the given merges, not the base and fine-tunes (no recovered gain).")] = False,
    samples: Annotated[int, typer.Option(help="Held-out records per task.")] = 64,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per record (longer records are truncated).")] = 512,
    skip: Annotated[int, typer.Option(help="Skip the first N usable records of each source (e.g. the N calibration read).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Records per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="Scoring device: cpu (default), cuda, cuda:N, mps, auto. Plans are merged on the CPU.")] = "cpu",
    threads: Annotated[int, typer.Option(help="CPU threads for merging and scoring.")] = max(1, os.cpu_count() or 1),
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for confidence intervals.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap draws.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout (no progress).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Held-out loss and token accuracy per task for merges beside the base and each fine-tune; recovered gain."""
    for flag, v, lo in (("--samples", samples, 1), ("--seq-len", seq_len, 2), ("--skip", skip, 0),
                        ("--batch-size", batch_size, 1), ("--threads", threads, 1), ("--bootstrap", bootstrap, 1)):
        if v < lo:
            raise MergeplanError(f"{flag} must be at least {lo}, got {v}")
    from .evaluate.data import parse_data_spec
    from .evaluate.report import dumps, print_report
    from .evaluate.run import evaluate

    report = evaluate(targets, parse_data_spec(data), remap=_parse_remap(model), base=base,
                      baselines=not no_baselines, samples=samples, seq_len=seq_len, skip=skip,
                      batch_size=batch_size, device=device, threads=threads, n_boot=bootstrap, seed=seed,
                      quiet=quiet or as_json, console=err)
    if as_json:
        sys.stdout.write(dumps(report))
    else:
        print_report(out, report)


@app.command()
def review(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN")],
    against: Annotated[Optional[Path], typer.Option("--against", help="Another plan to diff against.")] = None,
) -> None:
    """Open the plan in a terminal UI to inspect and edit it."""
    from mergeplan_tui import run_review

    # run_review reads the plans before the screen opens: a corrupt one fails as one line.
    code = run_review(str(plan_file), str(against) if against else None)
    # The screen is restored and every save was written (atomically) before run_review
    # returned; skip freeing the plan and the app object by object (0.1-0.2 s on a 70B
    # plan between `q` and the prompt).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    from . import interrupt

    restore = interrupt.install()  # SIGTERM/SIGHUP clean up like Ctrl-C
    try:
        _main()
    finally:
        restore()


def _main() -> None:
    from .safetext import markup

    try:
        app()
    except MergeplanError as e:
        if os.environ.get("MERGEPLAN_TRACEBACK"):
            raise
        # Messages quote plan strings, paths and recipe text: escaped, or a "[/bold]" in a
        # model id would raise here and an ESC would reach the terminal.
        err.print("[bold red]error[/]: " + markup(e), soft_wrap=True, emoji=False)
        sys.exit(e.exit_code)
    except OSError as e:
        # Permissions, a vanished disk...: say what and where, in one line.
        if os.environ.get("MERGEPLAN_TRACEBACK"):
            raise
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        err.print("[bold red]error[/]: " + markup(f"{e.strerror or e}{where}"), soft_wrap=True, emoji=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        sys.exit(130)


if __name__ == "__main__":
    main()
