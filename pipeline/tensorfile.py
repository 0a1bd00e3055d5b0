"""safetensors files written from and read into tensors without copying their data.

The format is safetensors' own (https://huggingface.co/docs/safetensors): a u64 little-endian header
length, a JSON header naming each tensor's dtype, shape and byte range, then the tensor data. The
``safetensors`` library reads and writes the same bytes (tests check both ways), but ``save`` returns
one new ``bytes`` object and ``load`` copies every tensor out of it: for a 4 GB model that is two
more copies of the model in memory. Here a writer gets the header plus a memoryview of each tensor's
own storage (written to the store as they are), and a reader gets tensors that are views of the
buffer it read (``torch.frombuffer``): one copy of the data, the one the store delivered.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class TensorFileError(ValueError):
    """The bytes are not a valid safetensors file; the message says what is wrong."""


def _flat_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def dump(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
         ) -> tuple[bytes, list[memoryview]]:
    """(header bytes, one memoryview per tensor): concatenated, they are a safetensors file.

    Tensors are laid out by decreasing element size, then name (as safetensors does), so that with an
    8-byte-aligned start every tensor's data is aligned for its dtype.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    head = _header({n: (tuple(tensors[n].shape), tensors[n].dtype) for n in order}, metadata)
    return head, [_flat_bytes(tensors[n]) for n in order]


def file_size(specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """The size in bytes of the safetensors file of tensors with these (shape, dtype), without making it."""
    order = sorted(specs, key=lambda n: (-itemsize(specs[n][1]), n))
    head = _header({n: specs[n] for n in order})
    return len(head) + sum(_numel(shape) * itemsize(dtype) for shape, dtype in specs.values())


def _header(specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]], metadata: Mapping[str, str] | None = None
            ) -> bytes:
    """Length prefix + JSON header (space-padded to 8 bytes) for tensors laid out in the order given."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        if dtype not in NAMES:
            raise TensorFileError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        size = _numel(shape) * itemsize(dtype)
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


def _numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def dumps(tensors: Mapping[str, torch.Tensor]) -> bytes:
    head, views = dump(tensors)
    return b"".join([head, *views])


Entry = tuple[torch.dtype, list[int], int, int]  # dtype, shape, first and last+1 byte in the data


def header_length(prefix: bytes | memoryview, size: int) -> int:
    """The JSON header's length from the file's first 8 bytes (checked against the file's `size`)."""
    if len(prefix) < 8 or size < 8:
        raise TensorFileError(f"{size} bytes is shorter than the 8-byte header length")
    (hlen,) = struct.unpack_from("<Q", prefix, 0)
    if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
        raise TensorFileError(f"header length {hlen} does not fit in {size} bytes")
    return int(hlen)


def parse_header(head: bytes | memoryview, data_size: int) -> list[tuple[str, Entry]]:
    """The tensors a JSON header describes, in the order of their data; checked to tile `data_size` bytes."""
    try:
        header = json.loads(bytes(head))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorFileError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise TensorFileError("header is not a JSON object")
    entries = [(n, _entry(n, e)) for n, e in header.items() if n != "__metadata__"]
    _check_layout(entries, data_size)
    return sorted(entries, key=lambda e: e[1][2])


def load(buf: memoryview, *, copy: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file in `buf`: views of it unless copy (read-only buffers are copied)."""
    hlen = header_length(buf[:8], len(buf))
    data = buf[8 + hlen :]
    entries = parse_header(buf[8 : 8 + hlen], len(data))
    if data.readonly or copy:
        data = memoryview(bytearray(data))
    return {name: _view(data, dtype, shape, begin, end) for name, (dtype, shape, begin, end) in entries}


def _entry(name: str, e: object) -> Entry:
    if not isinstance(e, dict):
        raise TensorFileError(f"tensor {name!r}: entry is not an object")
    dtype = DTYPES.get(str(e.get("dtype")))
    shape, offsets = e.get("shape"), e.get("data_offsets")
    if dtype is None:
        raise TensorFileError(f"tensor {name!r}: unknown dtype {e.get('dtype')!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise TensorFileError(f"tensor {name!r}: bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise TensorFileError(f"tensor {name!r}: bad data_offsets {offsets!r}")
    begin, end = offsets
    if end - begin != _numel(shape) * itemsize(dtype):
        raise TensorFileError(f"tensor {name!r}: {end - begin} bytes for shape {shape} of {NAMES[dtype]}")
    return dtype, shape, begin, end


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_layout(entries: list[tuple[str, Entry]], size: int) -> None:
    """Byte ranges must tile the data exactly, without overlap or gap (safetensors' own rule)."""
    at = 0
    for name, (_, _, begin, end) in sorted(entries, key=lambda e: (e[1][2], e[1][3])):
        if begin != at:
            raise TensorFileError(f"tensor {name!r}: data starts at {begin}, expected {at} (overlap or gap)")
        at = end
    if at != size:
        raise TensorFileError(f"tensor data covers {at} bytes, the file holds {size}")


def _view(data: memoryview, dtype: torch.dtype, shape: list[int], begin: int, end: int) -> torch.Tensor:
    if end == begin:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=begin)
    return raw.view(dtype).reshape(shape)
