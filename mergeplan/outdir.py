"""OUT_DIR for apply: who may write it, where the work goes meanwhile, how it lands.

Rules (a plan is untrusted, and the user's files matter more than the merge):
- OUT_DIR never overlaps an input model or holds the plan file, with or without --force.
- An existing OUT_DIR is replaced only with --force and only when it is a previous
  mergeplan output (it has mergeplan.json); anything else is left alone.
- One apply per OUT_DIR at a time: an advisory lock on `.NAME.mergeplan.lock` beside it,
  deleted by its holder at the end; a run that locked a file someone deleted meanwhile
  sees the inode changed and tries again, so two runs never hold two different locks.
- The work goes to `.NAME.mergeplan-XXXX/` beside OUT_DIR, marked as ours; holding the
  lock, a later apply removes such folders left by a killed run.
- It lands with one rename that never replaces a directory someone else created meanwhile
  (renameat2 RENAME_NOREPLACE where the kernel has it).
- Directories and files get the user's umask, like any file the user creates.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from pathlib import Path

from .errors import MergeplanError

MARKER = ".mergeplan-partial"  # inside a work folder: safe to delete when stale
PROVENANCE = "mergeplan.json"  # inside a finished output


def umask() -> int:
    # os.umask can only be read by setting it; done once per apply, before any thread starts.
    m = os.umask(0o022)
    os.umask(m)
    return m


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_target(out: Path, inputs: dict[str, Path], plan_path: str | None, force: bool) -> None:
    """Refuse an OUT_DIR that would overwrite inputs, the plan, or something not ours."""
    out_r = out.resolve()
    for mid, p in inputs.items():
        p = p.resolve()
        if _inside(out_r, p) or _inside(p, out_r):
            raise MergeplanError(f"output {out} overlaps input model {mid} ({p}); choose another output directory")
    if plan_path is not None and _inside(Path(plan_path).resolve(), out_r):
        raise MergeplanError(f"output {out} holds the plan file {plan_path}; choose another output directory")
    if out.is_symlink():
        raise MergeplanError(f"output {out} is a symbolic link; give a real directory path")
    if not os.path.lexists(out):
        return
    if not force:
        raise MergeplanError(f"output {out} already exists; pass --force to replace it or choose another directory")
    if not out.is_dir():
        raise MergeplanError(f"output {out} exists and is not a directory; remove it or choose another path")
    if not (out / PROVENANCE).is_file():
        raise MergeplanError(
            f"output {out} exists and is not a mergeplan output (no {PROVENANCE}); --force replaces only "
            "a previous merge: remove it yourself or choose another directory"
        )


class OutputSlot:
    """The lock on OUT_DIR, the work folder beside it and the final rename."""

    def __init__(self, out: Path):
        self.out = out
        self.parent = out.absolute().parent
        self.tmp: Path | None = None
        self._lock_fd: int | None = None
        self.removed_stale: list[str] = []

    def __enter__(self) -> "OutputSlot":
        import fcntl

        self.parent.mkdir(parents=True, exist_ok=True, mode=dir_mode())
        self._lock_path = self.parent / f".{self.out.name}.mergeplan.lock"
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
                         | getattr(os, "O_NOFOLLOW", 0), file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise MergeplanError(
                        f"another mergeplan apply is writing {self.out}; wait for it to finish or choose another directory"
                    ) from None
                raise
            try:
                same = os.stat(self._lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder deleted it as we opened it: lock the current file
        self._lock_fd = fd
        self._remove_stale()
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.mergeplan-", dir=self.parent))
        os.chmod(self.tmp, dir_mode())  # mkdtemp makes 0700
        (self.tmp / MARKER).touch()
        return self

    def _remove_stale(self) -> None:
        """Work folders of an earlier apply to this OUT_DIR that was killed: we hold the
        lock, so none of them belongs to a live run."""
        for p in self.parent.glob(glob_escape(f".{self.out.name}.old-") + "*"):
            # A --force run killed between moving the old output aside and renaming the new
            # one in: put the old output back rather than lose it.
            if p.is_dir() and not p.is_symlink() and (p / "x").is_dir() and not os.path.lexists(self.out):
                os.replace(p / "x", self.out)
        for p in self.parent.glob(glob_escape(f".{self.out.name}.mergeplan-") + "*"):
            if p.is_dir() and not p.is_symlink() and (p / MARKER).exists():
                shutil.rmtree(p, ignore_errors=True)
                self.removed_stale.append(str(p))
        for p in self.parent.glob(glob_escape(f".{self.out.name}.old-") + "*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                self.removed_stale.append(str(p))

    def commit(self, force: bool) -> None:
        """Move the finished work folder to OUT_DIR (replacing a previous output with force)."""
        assert self.tmp is not None
        (self.tmp / MARKER).unlink()
        if os.path.lexists(self.out):
            if not force:
                raise MergeplanError(f"output {self.out} appeared while merging; nothing was replaced: "
                                     "pass --force to replace it or choose another directory")
            check_target(self.out, {}, None, True)
            # Move the old output aside first so a crash never loses both.
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.parent))
            os.replace(self.out, old / "x")
            _rename_noreplace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _rename_noreplace(self.tmp, self.out)
        self.tmp = None

    def __exit__(self, *exc) -> None:
        try:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None
        finally:
            if self._lock_fd is not None:
                try:
                    os.unlink(self._lock_path)  # while still holding it (see the module doc)
                except FileNotFoundError:
                    pass
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None


def glob_escape(s: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in s)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc = None


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails if dst exists, even as an empty directory (which plain rename
    would silently replace)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.renameat2  # noqa: B018 - probe
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        rc = _libc.renameat2(_AT_FDCWD, os.fsencode(str(src)), _AT_FDCWD, os.fsencode(str(dst)), _RENAME_NOREPLACE)
        if rc == 0:
            return
        e = ctypes.get_errno()
        if e == errno.EEXIST:
            raise MergeplanError(f"output {dst} appeared while merging; nothing was replaced: choose another directory")
        if e not in (errno.EINVAL, errno.ENOSYS):  # filesystem without the flag: fall back
            raise OSError(e, os.strerror(e), str(dst))
    if os.path.lexists(dst):
        raise MergeplanError(f"output {dst} appeared while merging; nothing was replaced: choose another directory")
    os.rename(src, dst)
