"""A Hugging Face model directory of safetensors shards, read tensor by tensor.

Reads go through os.preadv into a fresh tensor: nothing keeps a whole shard mapped,
so resident memory is bounded by the tensors the caller holds, and several threads
may read at once (pread does not move a shared file position).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergeplan.errors import InputMismatchError, MergeplanError
from mergeplan.io import digests
from mergeplan.io.confine import blob_sha256, check_file_name, hub_snapshot, open_regular
from mergeplan.io.header import ParsedHeader, read_header

if TYPE_CHECKING:
    import torch

# torch is imported by the methods that make tensors (read), not at module import: opening a
# directory and checking its fingerprint read headers only, and the review's background
# check of the inputs must not spend seconds importing torch (it held up the first keys and
# the quit of `mergeplan review`).

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_FILE = "adapter_model.safetensors"

# Files that travel with the weights into a merged output directory.
AUX_FILE_NAMES = (
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HASH_CHUNK = 8 << 20
# Copied files (config, tokenizer, ...) larger than this are refused: real ones are at most
# tens of MB, and a plan must not make apply copy a huge file into the output.
AUX_MAX_BYTES = 256 << 20
_INDEX_MAX_BYTES = 64 << 20
# Linux caps one read at 0x7ffff000 bytes; stay under it and loop.
_MAX_READ = 1 << 30

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
    raise ImportError("mergeplan.io reads safetensors (little-endian) on little-endian hosts only")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. start/end are ABSOLUTE byte offsets in `file` (header included)."""

    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    file: str  # shard file name, relative to the model directory
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class ModelDir:
    """An opened model directory: tensor table parsed, shard files opened lazily for pread."""

    def __init__(self, path: Path, name: str, headers: dict[str, ParsedHeader],
                 infos: dict[str, TensorInfo]):
        self.path = path
        self.name = name
        self._headers = headers  # shard file name -> parsed header
        self._infos = infos
        self._names = sorted(infos)
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        self._expected: dict[str, bytes] = {}  # tensor -> BLAKE3 digest the plan recorded (apply)
        self.where = f"model {name} ({path})"

    # ---- opening -------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, name: str | None = None) -> "ModelDir":
        """Open a model directory; refuses anything but safetensors with one clear error."""
        p = Path(path).expanduser()
        if not p.exists():
            raise MergeplanError(f"model directory {p} does not exist")
        if not p.is_dir():
            raise MergeplanError(
                f"model path {p} is a file; pass the directory that holds it (with config.json)"
            )
        p = p.resolve()
        shard_files = _find_shards(p)
        headers = {}
        for f in shard_files:
            # Links may not lead out of the directory, and only regular files are read.
            fd, _, real = open_regular(p, f, "shard")
            os.close(fd)
            headers[f] = read_header(real)
        infos = _tensor_table(p, headers)
        if (p / INDEX_FILE).is_file() and not (p / SINGLE_FILE).is_file():
            _check_index(p, infos)
        return cls(p, name or p.name, headers, infos)

    # ---- tensor table --------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise MergeplanError(f"model {self.path} has no tensor {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    @property
    def shard_files(self) -> list[str]:
        return sorted(self._headers)

    # ---- reading -------------------------------------------------------------------

    def read(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """A fresh, owning tensor in the stored dtype (on `device` if given, else CPU);
        checked against the plan's digest when check_fingerprint was given one."""
        import torch

        from mergeplan.io.tensors import st_to_torch

        info = self.info(name)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            self._pread_into(info, memoryview(buf.numpy()))
        check = self.checker(name)
        if check is not None:
            check.feed(0, memoryview(buf.numpy()))
            check.finish()
        t = buf.view(st_to_torch(info.dtype)).reshape(info.shape)
        if device is not None and torch.device(device) != t.device:
            t = t.to(device)
        return t

    def read_into(self, name: str, byte_offset: int, buf: torch.Tensor) -> None:
        """Fill the uint8 tensor `buf` with the tensor's bytes from `byte_offset` on (a slice
        of a row-major tensor is a byte range): streamed apply reads this way."""
        info = self.info(name)
        if byte_offset < 0 or byte_offset + buf.numel() > info.nbytes:
            raise ValueError(f"byte range {byte_offset}+{buf.numel()} outside tensor {name!r} ({info.nbytes} bytes)")
        if buf.numel():
            self._pread_into(info, memoryview(buf.numpy()), byte_offset)

    def _pread_into(self, info: TensorInfo, mv: memoryview, offset: int = 0) -> None:
        fd = self._fd(info.file)
        done, total = 0, len(mv)
        try:
            while done < total:
                n = os.preadv(fd, [mv[done:done + _MAX_READ]], info.start + offset + done)
                if n == 0:
                    raise MergeplanError(
                        f"{self.path / info.file} ended while reading tensor {info.name!r} "
                        "(file truncated since it was opened?)"
                    )
                done += n
        except OSError as e:
            raise MergeplanError(
                f"cannot read tensor {info.name!r} from {self.path / info.file}: {e.strerror}"
            ) from None

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._fd_lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = open_regular(self.path, file, "shard")[0]
                    self._fds[file] = fd
        return fd

    def close(self) -> None:
        with self._fd_lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> "ModelDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---- fingerprints --------------------------------------------------------------

    def fingerprint(self, full: bool = False, tensor_blake3: dict[str, bytes] | None = None,
                    aux: list[str] | None = None) -> dict:
        """Plain-data identity of the weights: shard sizes and header hashes, the tensor table,
        with `tensor_blake3` each tensor's content digest (the planner hashes what it reads),
        with `aux` the copied files' sizes and sha256. `full` adds each shard's sha256 (reads
        everything); in the Hugging Face cache the blob names give it for free."""
        files = self.shard_files
        sums: list[str | None] = [blob_sha256(self.path, f) for f in files]
        if full and None in sums:
            # hashlib releases the GIL on large updates, so a few threads overlap I/O and hashing.
            with ThreadPoolExecutor(max_workers=min(4, len(files))) as pool:
                sums = list(pool.map(self._sha256, files))
        shards = [
            {
                "file": f,
                "size": self._headers[f].file_size,
                "header_sha256": self._headers[f].sha256,
                "sha256": s,
            }
            for f, s in zip(files, sums)
        ]
        tensors = [[n, self._infos[n].dtype, list(self._infos[n].shape)] for n in self._names]
        fp: dict = {"shards": shards, "tensors": tensors}
        if tensor_blake3 is not None:
            missing = [n for n in self._names if n not in tensor_blake3]
            for n in missing:  # tensors the planner did not read (e.g. buffers it copies from another model)
                tensor_blake3[n] = digests.tensor_blake3(self.read(n))
            fp["tensor_blake3"] = digests.pack([tensor_blake3[n] for n in self._names])
        if aux is not None:
            fp["files"] = [self.aux_fingerprint(f) for f in aux]
        return fp

    def _sha256(self, file: str) -> str:
        fd, size, _ = open_regular(self.path, file, "shard")
        try:
            return digests.file_sha256(fd, size, str(self.path / file), chunk=_HASH_CHUNK)
        finally:
            os.close(fd)

    def check_fingerprint(self, recorded: dict, full: bool = False, content: dict[str, bytes] | None = None) -> None:
        """Raise InputMismatchError (one line) if these weights differ from `recorded`.

        Shard names, sizes, header hashes and the tensor table now; `content` (tensor ->
        digest, ModelRef.content_digests) is kept to check every later read against. `full`
        also reads every tensor now (or, without `content`, every shard's recorded sha256).
        """
        where = f"model {self.name} ({self.path})"
        try:
            rec_shards = {s["file"]: s for s in recorded["shards"]}
            rec_tensors = {t[0]: (t[1], tuple(t[2])) for t in recorded["tensors"]}
        except (KeyError, TypeError, IndexError):
            raise MergeplanError(f"malformed fingerprint recorded for {where}") from None

        now_files = set(self._headers)
        for f in sorted(set(rec_shards) - now_files):
            raise InputMismatchError(f"{where}: shard {f} recorded in the plan is not there now")
        for f in sorted(now_files - set(rec_shards)):
            raise InputMismatchError(f"{where}: shard {f} is present but the plan did not record it")

        for n in sorted(set(rec_tensors) | set(self._infos)):
            if n not in self._infos:
                raise InputMismatchError(f"{where}: tensor {n} recorded in the plan is missing")
            info = self._infos[n]
            if n not in rec_tensors:
                raise InputMismatchError(
                    f"{where}: tensor {n} (shard {info.file}) was not in the model the plan recorded"
                )
            dtype, shape = rec_tensors[n]
            if (dtype, shape) != (info.dtype, info.shape):
                raise InputMismatchError(
                    f"{where}: tensor {n} (shard {info.file}) is {info.dtype}{list(info.shape)}, "
                    f"the plan recorded {dtype}{list(shape)}"
                )

        for f in sorted(now_files):
            rec, hdr = rec_shards[f], self._headers[f]
            if rec.get("size") != hdr.file_size:
                raise InputMismatchError(
                    f"{where}: shard {f} is {hdr.file_size} bytes, the plan recorded {rec.get('size')}"
                )
            if rec.get("header_sha256") != hdr.sha256:
                raise InputMismatchError(
                    f"{where}: shard {f} header (tensor layout/metadata) differs from the one recorded"
                )
        self._expected = dict(content or {})
        if not full:
            return
        if self._expected:
            # Every tensor read and checked now, before any output is written.
            for n in self._names:
                self.read(n)
            return
        for f in sorted(now_files):
            want = rec_shards[f].get("sha256")
            if want is None:
                raise MergeplanError(
                    f"{where}: the plan recorded no content hash for shard {f}, so a full check "
                    "is impossible; re-plan with full fingerprints or use the fast check"
                )
            if self._sha256(f) != want:
                raise InputMismatchError(
                    f"{where}: shard {f} content (sha256) differs from the one recorded in the plan"
                )

    # ---- companions ----------------------------------------------------------------

    def checker(self, name: str, record: bool = False) -> "digests.SequentialCheck | None":
        """A check of this tensor's bytes against the plan's digest, fed as they are read;
        None when the plan recorded no digest for it. `record`: hash to record (planner)."""
        want = self._expected.get(name)
        if want is None and not record:
            return None
        info = self.info(name)
        return digests.SequentialCheck(want, info.nbytes, self.where, name, info.file)

    @property
    def verifies_content(self) -> bool:
        """Whether reads are checked against recorded tensor digests."""
        return bool(self._expected)

    def aux_files(self) -> list[str]:
        """Config, generation config and tokenizer files present, as names in the directory."""
        return sorted(f for f in AUX_FILE_NAMES if os.path.lexists(self.path / f))

    def aux_fingerprint(self, name: str) -> dict:
        """{file, size, sha256} of a file copied into the output (confined, regular, capped)."""
        if name not in AUX_FILE_NAMES:
            raise MergeplanError(f"{self.where}: {name!r} is not a file mergeplan copies into an output")
        fd, size, _ = open_regular(self.path, name, "file", AUX_MAX_BYTES)
        try:
            return {"file": name, "size": size, "sha256": digests.file_sha256(fd, size, str(self.path / name))}
        finally:
            os.close(fd)

    def copy_aux(self, name: str, dest: Path, recorded: dict | None, mode: int) -> None:
        """Copy one allow-listed file into `dest` (a new file), checking it against `recorded`
        ({size, sha256} from the plan) when the plan has it; never follows a link out of the
        directory, never reads more than AUX_MAX_BYTES."""
        if name not in AUX_FILE_NAMES:
            raise MergeplanError(f"the plan asks to copy {name!r}, which is not a config or tokenizer file "
                                 "mergeplan copies; the plan is corrupt or hostile")
        fd, size, _ = open_regular(self.path, name, "file", AUX_MAX_BYTES)
        try:
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
            try:
                sha = digests.file_sha256(fd, size, str(self.path / name), sink=lambda b: _write_all(out, b))
            finally:
                os.close(out)
        finally:
            os.close(fd)
        self._match_aux(name, {"size": size, "sha256": sha}, recorded)

    def check_aux(self, name: str, recorded: dict | None) -> None:
        """`validate --inputs`: the copied file as copy_aux would find it."""
        self._match_aux(name, self.aux_fingerprint(name), recorded)

    def _match_aux(self, name: str, got: dict, recorded: dict | None) -> None:
        if recorded is not None and (recorded.get("size"), recorded.get("sha256")) != (got["size"], got["sha256"]):
            raise InputMismatchError(
                f"{self.where}: {name} differs from the file the plan was made from (sha256); restore it or re-plan"
            )

    @property
    def hub(self) -> dict | None:
        """{repo, revision} when this directory is a Hugging Face cache snapshot."""
        snap = hub_snapshot(self.path)
        return {"repo": snap.repo, "revision": snap.revision} if snap else None

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r}, name={self.name!r}, tensors={len(self._infos)})"


def _write_all(fd: int, b: bytes) -> None:
    mv = memoryview(b)
    while mv:
        mv = mv[os.write(fd, mv):]


def _find_shards(p: Path) -> list[str]:
    """Shard files to read, following transformers' preference: single file, index, then any."""
    if (p / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    index = p / INDEX_FILE
    if index.is_file():
        weight_map = _load_weight_map(index)
        files = sorted(set(weight_map.values()))
        if not files:
            raise MergeplanError(f"{index} maps no tensors to shards; re-download the model")
        for f in files:
            if os.path.exists(p / f) and not (p / f).is_file():
                raise MergeplanError(f"shard {p / f} is not a regular file; refusing to read it")
            if not (p / f).is_file():
                raise MergeplanError(
                    f"shard {f} named by {index} is missing from {p}; re-download the model"
                )
        return files
    files = sorted(
        e.name for e in p.iterdir()
        if e.name.endswith(".safetensors") and e.name != ADAPTER_FILE and e.is_file()
    )
    if files:
        return files
    # Name the refusal precisely; never open (let alone unpickle) these files.
    pickles = sorted(
        e.name for e in p.iterdir() if e.name.endswith(_PICKLE_SUFFIXES) and e.is_file()
    )
    if pickles:
        raise MergeplanError(
            f"{p} holds only PyTorch pickle weights ({', '.join(pickles[:3])}"
            f"{', ...' if len(pickles) > 3 else ''}); mergeplan reads safetensors only — convert "
            "with transformers in a trusted environment: from_pretrained(dir).save_pretrained(out) "
            "writes safetensors"
        )
    if (p / ADAPTER_FILE).is_file():
        raise MergeplanError(
            f"{p} holds a PEFT adapter ({ADAPTER_FILE}), not full weights; merge it into its "
            "base first (peft merge_and_unload + save_pretrained)"
        )
    raise MergeplanError(f"{p} has no *.safetensors weights; point at a Hugging Face model directory")


def _load_weight_map(index: Path) -> dict[str, str]:
    try:
        fd, size, _ = open_regular(index.parent, index.name, "index", _INDEX_MAX_BYTES)
        try:
            text = os.pread(fd, size, 0).decode("utf-8")
        finally:
            os.close(fd)
        obj = json.loads(text)
        weight_map = obj["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError):
        raise MergeplanError(
            f"{index} is not a valid safetensors index (needs a \"weight_map\" of tensor -> file)"
        ) from None
    for f in weight_map.values():
        check_file_name(f, f"shard named by {index}")
    return weight_map


def _tensor_table(p: Path, headers: dict[str, ParsedHeader]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for f in sorted(headers):
        hdr = headers[f]
        for n, e in hdr.entries.items():
            if n in infos:
                raise MergeplanError(
                    f"tensor {n!r} appears in both {infos[n].file} and {f} in {p}; "
                    "remove stale shards from the directory"
                )
            start = hdr.data_start + e.begin
            infos[n] = TensorInfo(n, e.dtype, e.shape, f, start, start + (e.end - e.begin))
    return infos


def _check_index(p: Path, infos: dict[str, TensorInfo]) -> None:
    weight_map = _load_weight_map(p / INDEX_FILE)
    for n, f in sorted(weight_map.items()):
        if n not in infos:
            raise MergeplanError(
                f"{p / INDEX_FILE} maps tensor {n!r} to {f}, but that shard does not hold it"
            )
        if infos[n].file != f:
            raise MergeplanError(
                f"{p / INDEX_FILE} maps tensor {n!r} to {f}, but it is stored in {infos[n].file}"
            )
