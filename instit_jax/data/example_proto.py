"""``tf.train.Example`` protobuf encoding and decoding by hand (no TensorFlow, no generated code).

Wire layout: Example{features=1: Features{feature=1: map<string, Feature>}}; Feature is a oneof of
bytes_list=1, float_list=2, int64_list=3, each a message with ``repeated value = 1`` (floats and ints
packed, as TensorFlow writes them; unpacked input is accepted too).
Python values: ``list[bytes]`` (or str / bytes) -> bytes_list, ``list[int]`` -> int64_list,
``list[float]`` / float ndarray -> float_list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # negative int64 -> two's complement, 10 bytes
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:
    return _varint((num << 3) | 2) + _varint(len(payload)) + payload


def _encode_feature(name: str, value: Any) -> bytes:
    if isinstance(value, (bytes, str)):
        value = [value]
    if isinstance(value, np.ndarray):
        value = value.ravel()
        kind = "float" if value.dtype.kind == "f" else "int" if value.dtype.kind in "iub" else None
        if kind is None:
            raise TypeError(f"feature {name!r}: unsupported array dtype {value.dtype}")
    else:
        value = list(value)
        if all(isinstance(v, (bytes, str)) for v in value) and value:
            kind = "bytes"
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
            kind = "int"
        elif all(isinstance(v, (int, float, np.floating, np.integer)) for v in value):
            kind = "float"
        else:
            raise TypeError(f"feature {name!r}: values must be all bytes/str, all int or all float")
    if kind == "bytes":
        inner = b"".join(_field(1, v.encode() if isinstance(v, str) else bytes(v)) for v in value)
        feat = _field(1, inner)
    elif kind == "float":
        packed = np.asarray(value, dtype="<f4").tobytes()
        feat = _field(2, _field(1, packed) if len(value) else b"")
    else:
        packed = b"".join(_varint(int(v)) for v in value)
        feat = _field(3, _field(1, packed) if len(value) else b"")
    return _field(1, _field(1, name.encode()) + _field(2, feat))


def encode_example(features: Mapping[str, Any]) -> bytes:
    """Serialises a feature dict to ``tf.train.Example`` bytes (keys sorted, so output is deterministic)."""
    return _field(1, b"".join(_encode_feature(k, features[k]) for k in sorted(features)))


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: memoryview):
    """Yields (field_number, wire_type, value) with value a memoryview (wire 2) or int."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 2:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError(f"field {num} overruns its message")
            yield num, wire, buf[pos:pos + n]
            pos += n
        elif wire == 0:
            v, pos = _read_varint(buf, pos)
            yield num, wire, v
        elif wire in (1, 5):  # fixed64 / fixed32
            n = 8 if wire == 1 else 4
            if pos + n > len(buf):
                raise ValueError(f"field {num} overruns its message")
            yield num, wire, buf[pos:pos + n]
            pos += n
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _message(val: Any, what: str) -> memoryview:
    """A field that must be length-delimited (a sub-message or bytes); ValueError when it is a number."""
    if not isinstance(val, memoryview):
        raise ValueError(f"{what} is not length-delimited")
    return val


def _decode_feature(buf: memoryview) -> Any:
    for num, _wire, val in _fields(buf):
        if num == 1:
            return [bytes(_message(v, "a bytes_list value")) for n, w, v in _fields(_message(val, "bytes_list"))
                    if n == 1]
        if num == 2:
            parts = []
            for n, _w, v in _fields(_message(val, "float_list")):
                if n == 1:  # packed (wire 2) or a single fixed32 (wire 5): both are raw float32 bytes
                    v = _message(v, "a float_list value")
                    if len(v) % 4:
                        raise ValueError("float_list bytes are not a whole number of float32")
                    parts.append(np.frombuffer(v, dtype="<f4"))
            return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
        if num == 3:
            ints: list[int] = []
            for n, w, v in _fields(_message(val, "int64_list")):
                if n != 1:
                    continue
                if w == 0:
                    ints.append(_signed(v))
                else:
                    v = _message(v, "an int64_list value")
                    p = 0
                    while p < len(v):
                        x, p = _read_varint(v, p)
                        ints.append(_signed(x))
            return np.asarray(ints, dtype=np.int64)
    return []


def decode_example(data: bytes | memoryview) -> dict[str, Any]:
    """Parses ``tf.train.Example`` bytes: bytes_list -> list[bytes], int64 -> int64 [n], float -> float32 [n]."""
    out: dict[str, Any] = {}
    buf = memoryview(data)
    for num, _w, feats in _fields(buf):
        if num != 1:
            continue
        for n, _w2, entry in _fields(_message(feats, "features")):
            if n != 1:
                continue
            key, value = None, memoryview(b"")
            for en, _w3, ev in _fields(_message(entry, "a feature map entry")):
                if en == 1:
                    key = bytes(_message(ev, "a feature key")).decode()
                elif en == 2:
                    value = _message(ev, "a feature value")
            if key is None:
                raise ValueError("feature map entry without a key")
            out[key] = _decode_feature(value)
    return out

