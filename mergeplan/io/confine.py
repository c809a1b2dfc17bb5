"""Which files of an input model directory may be read, and where they really are.

A plan names files (shards, copied config/tokenizer files) and the directories they sit
in; a received plan is untrusted and a model directory may hold links. Every file mergeplan
reads from a model is therefore opened through `open_regular`: the name must be a plain
file name, the path after resolving links must stay inside the model directory (or, for a
Hugging Face cache snapshot, inside that repository's `blobs/` folder, where the snapshot's
links point), and it must be a regular file: never a device, a FIFO (which would block
the open) or a directory.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from mergeplan.errors import MergeplanError

# huggingface_hub cache layout: <cache>/models--<org>--<name>/snapshots/<commit>/<file>,
# each file a link to ../../blobs/<etag>; for LFS files (every safetensors shard) the
# etag is the sha256 of the content.
_SNAPSHOT = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HubSnapshot:
    repo: str  # "org/name"
    revision: str  # the commit hash the snapshot holds
    blobs: Path


def hub_snapshot(model_dir: Path) -> HubSnapshot | None:
    """The hub repo and commit when `model_dir` is a snapshot folder of the HF cache."""
    d = Path(model_dir)
    if d.parent.name != "snapshots" or not _COMMIT.match(d.name):
        return None
    m = _SNAPSHOT.match(d.parent.parent.name)
    if not m:
        return None
    return HubSnapshot(f"{m['org']}/{m['name']}", d.name, (d.parent.parent / "blobs").resolve())


def roots_of(model_dir: Path) -> tuple[Path, ...]:
    """Directories files of this model may resolve into."""
    d = Path(model_dir).resolve()
    snap = hub_snapshot(Path(model_dir).absolute())
    return (d,) if snap is None else (d, snap.blobs)


def check_file_name(name: object, where: str) -> str:
    """A plain file name (no directory part, no '..', no NUL), or a MergeplanError."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\0" in name or Path(name).name != name:
        raise MergeplanError(f"{where}: {name!r} is not a plain file name; the plan or index is corrupt or hostile")
    return name


def resolve_inside(model_dir: Path, name: str, what: str) -> Path:
    """model_dir / name with links resolved, refused when it leaves the model's roots."""
    check_file_name(name, f"{what} in {model_dir}")
    p = Path(model_dir) / name
    real = p.resolve()
    if not any(r in real.parents for r in roots_of(model_dir)):
        raise MergeplanError(
            f"{p} is a link to {real}, outside the model directory; mergeplan reads only files inside "
            "an input directory: copy the file into it instead of linking"
        )
    return real


def open_regular(model_dir: Path, name: str, what: str = "file", max_size: int | None = None) -> tuple[int, int, Path]:
    """(fd, size, resolved path) of a regular file `name` inside the model directory.

    O_NONBLOCK so that a FIFO cannot hang the open; fstat on the opened descriptor, so
    what is checked is what is read."""
    real = resolve_inside(model_dir, name, what)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise MergeplanError(f"cannot open {what} {Path(model_dir) / name}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MergeplanError(f"{what} {Path(model_dir) / name} is not a regular file; refusing to read it")
        if max_size is not None and st.st_size > max_size:
            raise MergeplanError(
                f"{what} {Path(model_dir) / name} is {st.st_size} bytes, over the {max_size}-byte limit for "
                "files copied into the output; remove it from the model directory or re-plan"
            )
        # Back to blocking reads now that we know it is a regular file.
        os.set_blocking(fd, True)
        return fd, st.st_size, real
    except BaseException:
        os.close(fd)
        raise


def blob_sha256(model_dir: Path, name: str) -> str | None:
    """The sha256 of a HF-cache snapshot file, free from its blob's name (LFS files only)."""
    if hub_snapshot(Path(model_dir).absolute()) is None:
        return None
    real = (Path(model_dir) / name).resolve()
    return real.name if _SHA256.match(real.name) and real.parent.name == "blobs" else None
