"""Decide output shard files and the exact byte layout of each, before any tensor exists.

Splitting and file naming are huggingface_hub's (`split_state_dict_into_shards_factory`,
as transformers' save_pretrained uses it), fed with sizes only. The layout inside each
file is safetensors' own (see mergeplan.io.header), so a shard written tensor by tensor
at these offsets equals what `safetensors.torch.save_file` would produce.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from huggingface_hub import split_state_dict_into_shards_factory

from mergeplan.errors import MergeplanError
from mergeplan.io.header import encode_header, st_order
from mergeplan.io.tensors import nbytes

SHARD_METADATA = {"format": "pt"}
FILENAME_PATTERN = "model{suffix}.safetensors"


@dataclass(frozen=True)
class ShardTensor:
    """One tensor's slot in a shard; start/end are ABSOLUTE byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardLayout:
    file: str  # e.g. "model-00001-of-00003.safetensors"
    tensors: tuple[ShardTensor, ...]  # in file (data) order
    header: bytes  # length prefix + padded JSON, written verbatim at offset 0

    @property
    def size(self) -> int:
        """Final file size in bytes."""
        return self.tensors[-1].end if self.tensors else len(self.header)

    @property
    def data_size(self) -> int:
        return self.size - len(self.header)

    @cached_property
    def _by_name(self) -> dict[str, ShardTensor]:
        return {t.name: t for t in self.tensors}

    def slot(self, name: str) -> ShardTensor:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name


@dataclass(frozen=True)
class _Sized:
    """Stand-in for a tensor: the splitter needs nothing but its size."""

    nbytes: int


def plan_shards(
    entries: list[tuple[str, str, tuple[int, ...]]], max_shard_size: int | str = "5GB"
) -> list[ShardLayout]:
    """Shard layouts for (name, safetensors dtype, shape) entries.

    Tensors are assigned to shards in the order given (as save_pretrained does with a
    state dict), so pass a deterministic order; one file is named "model.safetensors",
    several "model-0000i-of-0000n.safetensors". A tensor bigger than max_shard_size gets
    a shard of its own.
    """
    if not entries:
        raise MergeplanError("no tensors to write: the merged model would be empty")
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, dtype, shape in entries:
        if name in specs:
            raise MergeplanError(f"tensor {name!r} is listed twice for the output model")
        if name == "__metadata__":
            raise MergeplanError("a tensor cannot be named '__metadata__' in safetensors")
        specs[name] = (dtype, tuple(int(d) for d in shape))
    sized = {name: _Sized(nbytes(dtype, shape)) for name, (dtype, shape) in specs.items()}
    try:
        split = split_state_dict_into_shards_factory(
            sized,
            get_storage_size=lambda s: s.nbytes,
            filename_pattern=FILENAME_PATTERN,
            max_shard_size=max_shard_size,
        )
    except ValueError as e:  # unparsable size string
        raise MergeplanError(f"bad max_shard_size {max_shard_size!r}: {e}") from None
    return [
        _layout(file, [(n, *specs[n]) for n in names])
        for file, names in split.filename_to_tensors.items()
    ]


def _layout(file: str, items: list[tuple[str, str, tuple[int, ...]]]) -> ShardLayout:
    shapes = {n: s for n, _, s in items}
    ordered = st_order([(n, d) for n, d, _ in items])
    rel: list[tuple[str, str, tuple[int, ...], int, int]] = []
    offset = 0
    for n, d in ordered:
        size = nbytes(d, shapes[n])
        rel.append((n, d, shapes[n], offset, offset + size))
        offset += size
    header = encode_header(rel, SHARD_METADATA)
    base = len(header)
    tensors = tuple(ShardTensor(n, d, s, base + b, base + e) for n, d, s, b, e in rel)
    return ShardLayout(file=file, tensors=tensors, header=header)
