"""Validation of a safetensors file's header before any tensor is read.

Layout: 8 bytes little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {str: str}}``, then the data buffer. ``check_safetensors`` reads only the
header (at most ``max_header_bytes``) and refuses a file whose header is not that JSON, names an unknown
dtype, gives a shape whose byte size differs from its offsets, or points past the end of the file or
into another tensor, so a lying header can never make the loader allocate without bound.
"""
from __future__ import annotations

import json
import math
import os
import struct

from data_gen.confine import InputRejected

MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class CheckpointFileError(InputRejected):
    """A checkpoint file is malformed or inconsistent; the message names the file and tensor."""


def check_safetensors(path: str | os.PathLike, *, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, dict]:
    """The tensor entries of ``path``'s header (``{name: {dtype, shape, data_offsets}}``), validated."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFileError(f"{path}: {size} bytes is too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > max_header_bytes or n > size - 8:
            raise CheckpointFileError(f"{path}: header length {n} exceeds the file ({size} bytes) or the "
                                      f"limit {max_header_bytes}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointFileError(f"{path}: header is not UTF-8 JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    data_size = size - 8 - n
    tensors, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not (isinstance(entry, dict)
                                          and all(isinstance(v, str) for v in entry.values())):
                raise CheckpointFileError(f"{path}: __metadata__ must map strings to strings")
            continue
        where = f"{path}: tensor {name[:80]!r}"
        if not isinstance(entry, dict):
            raise CheckpointFileError(f"{where}: entry must be an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise CheckpointFileError(f"{where}: unknown dtype {dtype!r:.40}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise CheckpointFileError(f"{where}: shape must be a list of non-negative integers, got {shape!r:.60}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise CheckpointFileError(f"{where}: data_offsets must be [begin, end], got {offsets!r:.60}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise CheckpointFileError(f"{where}: data_offsets {offsets} lie outside the data buffer of "
                                      f"{data_size} bytes")
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if nbytes != end - begin:
            raise CheckpointFileError(f"{where}: {dtype} {shape} needs {nbytes} bytes, data_offsets give "
                                      f"{end - begin}")
        spans.append((begin, end, name))
        tensors[name] = entry
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointFileError(f"{path}: tensors {n0[:80]!r} and {n1[:80]!r} overlap in the data buffer")
        if b1 > e0:  # the format (and safetensors' own reader) wants the tensors to tile the buffer
            raise CheckpointFileError(f"{path}: {b1 - e0} bytes between tensors {n0[:80]!r} and {n1[:80]!r} "
                                      "belong to no tensor")
    first, covered = (spans[0][0], spans[-1][1]) if spans else (0, 0)
    if first != 0 or covered != data_size:
        raise CheckpointFileError(f"{path}: the tensors cover bytes {first}..{covered} of a data buffer of "
                                  f"{data_size} bytes; the format wants all of it, from 0")
    return tensors
