"""TFRecord shards of ``tf.train.Example`` written and read without TensorFlow, with random access.

Framing per record: uint64 length, uint32 masked CRC32C(length), data, uint32 masked CRC32C(data).
Beside every shard ``X.tfrecord`` sits ``X.tfrecord.idx``: little-endian uint64 pairs (offset, length of
the whole framed record), so reading record ``i`` is one ``pread``. Shards and indices are written to a
temporary name and renamed, so a crash never leaves a half shard under the final name. ``manifest.json``
lists shards with record counts and sha256 hashes.

A sample record holds untokenised conversations and encoded media, so one build serves every model and
chat template (see ``sample_features`` / ``parse_sample``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from data_gen.confine import MAX_LINE_BYTES, InputRejected, check_file_size, confine
from instit_jax.data.crc32c import backend as crc_backend
from instit_jax.data.crc32c import masked_crc32c
from instit_jax.data.example_proto import decode_example, encode_example

MANIFEST = "manifest.json"
FORMAT = "instit-tfrecord-v1"


class RecordCorruptError(InputRejected, IOError):
    """A TFRecord failed its CRC or framing check; the message names file and byte offset."""


def frame_record(data: bytes) -> bytes:
    """One TFRecord frame around ``data``."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class TFRecordWriter:
    """Writes one shard atomically (``path.tmp`` -> ``path``) plus its ``.idx`` sidecar on ``close()``."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._tmp = f"{self.path}.tmp{os.getpid()}"
        self._f = open(self._tmp, "wb")
        self._offsets: list[tuple[int, int]] = []
        self._pos = 0
        self._sha = hashlib.sha256()

    def write(self, data: bytes) -> None:
        framed = frame_record(data)
        self._f.write(framed)
        self._sha.update(framed)
        self._offsets.append((self._pos, len(framed)))
        self._pos += len(framed)

    def close(self) -> dict:
        """Finishes the shard; returns its manifest entry."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        idx = np.asarray(self._offsets, dtype="<u8").reshape(-1, 2)
        idx_tmp = f"{self.path}.idx.tmp{os.getpid()}"
        idx.tofile(idx_tmp)
        os.replace(self._tmp, self.path)
        os.replace(idx_tmp, self.path + ".idx")
        return {"file": os.path.basename(self.path), "num_records": len(self._offsets), "bytes": self._pos,
                "sha256": self._sha.hexdigest()}

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()
            if os.path.exists(self._tmp):
                os.remove(self._tmp)


def scan_offsets(path: str | os.PathLike) -> np.ndarray:
    """Builds the (offset, framed length) index [N, 2] of a shard by walking it (checks lengths only)."""
    path = os.fspath(path)
    out, pos, size = [], 0, os.path.getsize(path)
    with open(path, "rb") as f:
        while pos < size:
            head = f.read(12)
            if len(head) < 12:
                raise RecordCorruptError(f"{path}: truncated record header at byte offset {pos}")
            (n,) = struct.unpack("<Q", head[:8])
            if struct.unpack("<I", head[8:])[0] != masked_crc32c(head[:8]):
                raise RecordCorruptError(f"{path}: length CRC mismatch at byte offset {pos}")
            out.append((pos, n + 16))
            pos += n + 16
            f.seek(pos)
    if pos != size:
        raise RecordCorruptError(f"{path}: last record overruns the file at byte offset {out[-1][0]}")
    return np.asarray(out, dtype=np.uint64).reshape(-1, 2)


class TFRecordShard:
    """Random access to the records of one shard; CRCs are checked on every read. Picklable."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = os.fspath(path)
        self.verify = verify
        if not os.path.isfile(self.path):
            raise RecordCorruptError(f"{self.path}: shard file is missing")
        idx_path = self.path + ".idx"
        if os.path.exists(idx_path):
            raw = np.fromfile(idx_path, dtype=np.uint8)
            if raw.size % 16:
                raise RecordCorruptError(f"{idx_path}: {raw.size} bytes is not a whole number of (offset, length) "
                                         "pairs of 16 bytes")
            self.index = raw.view("<u8").reshape(-1, 2)
            size = os.path.getsize(self.path)
            off, n = self.index[:, 0], self.index[:, 1]
            bad = np.flatnonzero((n < 16) | (n > size) | (off > size - np.minimum(n, size)))
            if bad.size:
                i = int(bad[0])
                raise RecordCorruptError(f"{idx_path}: entry {i} (offset {int(off[i])}, length {int(n[i])}) does "
                                         f"not fit the shard of {size} bytes")
        else:
            self.index = scan_offsets(self.path)
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        return {"path": self.path, "verify": self.verify, "index": self.index}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fd, self._pid = None, None

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # reopen after fork
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, i: int) -> bytes:
        """The payload of record ``i``."""
        off, n = int(self.index[i, 0]), int(self.index[i, 1])
        buf = os.pread(self._file(), n, off)
        if len(buf) != n:
            raise RecordCorruptError(f"{self.path}: record {i} truncated at byte offset {off}")
        (length,) = struct.unpack_from("<Q", buf, 0)
        if length + 16 != n:
            raise RecordCorruptError(f"{self.path}: record {i} length field {length} disagrees with the index "
                                     f"at byte offset {off}")
        data = buf[12:12 + length]
        if self.verify:
            if struct.unpack_from("<I", buf, 8)[0] != masked_crc32c(buf[:8]):
                raise RecordCorruptError(f"{self.path}: record {i}: length CRC mismatch at byte offset {off}")
            if struct.unpack_from("<I", buf, 12 + length)[0] != masked_crc32c(data):
                raise RecordCorruptError(f"{self.path}: record {i}: data CRC mismatch in bytes "
                                         f"{off + 12}..{off + 12 + length} (record at byte offset {off})")
        return data

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


class ShardedRecordSource:
    """Grain-compatible random-access source over all shards in a manifest directory.

    ``source[i]`` returns the parsed sample dict (see ``parse_sample``), or raw bytes with ``raw=True``.
    """

    def __init__(self, directory: str | os.PathLike, *, verify: bool = True, raw: bool = False):
        self.directory = os.fspath(directory)
        self.manifest = read_manifest(self.directory)
        self.shards = [TFRecordShard(_shard_path(self.directory, s), verify) for s in self.manifest["shards"]]
        for s, meta in zip(self.shards, self.manifest["shards"]):
            if len(s) != meta["num_records"]:
                raise RecordCorruptError(f"{s.path}: index has {len(s)} records, manifest says "
                                         f"{meta['num_records']}")
        self._starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.raw = raw

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> Any:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range [0, {len(self)})")
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        j = i - int(self._starts[k])
        data = self.shards[k].read(j)
        if self.raw:
            return data
        try:
            return parse_sample(data)
        except RecordCorruptError as e:
            raise RecordCorruptError(f"{self.shards[k].path}: record {j}: {e}") from e

    def __repr__(self) -> str:
        return f"ShardedRecordSource({self.directory!r}, n={len(self)})"


def read_manifest(directory: str | os.PathLike) -> dict:
    """The shards' manifest.json, checked: format, and per shard a file name, a record count and a sha256."""
    path = os.path.join(os.fspath(directory), MANIFEST)
    try:
        check_file_size(path, MAX_LINE_BYTES, path)
        with open(path, encoding="utf-8") as f:
            man = json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no manifest; build shards with instit-build-data") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge integers
        if isinstance(e, InputRejected):
            raise
        raise RecordCorruptError(f"{path}: not UTF-8 JSON ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(man, dict):
        raise RecordCorruptError(f"{path}: expected a JSON object, got {type(man).__name__}")
    if man.get("format") != FORMAT:
        raise RecordCorruptError(f"{path}: field 'format' is {man.get('format')!r:.80}, expected {FORMAT!r}")
    shards = man.get("shards")
    if not isinstance(shards, list):
        raise RecordCorruptError(f"{path}: field 'shards' must be a list")
    for k, s in enumerate(shards):
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("sha256"), str)
                and isinstance(s.get("num_records"), int) and not isinstance(s.get("num_records"), bool)):
            raise RecordCorruptError(f"{path}: shards[{k}] must be an object with 'file' (string), "
                                     "'num_records' (integer) and 'sha256' (string)")
    return man


def _shard_path(directory: str, entry: dict) -> str:
    """A manifest's shard file, confined to the manifest's folder."""
    return str(confine(entry["file"], directory, f"{os.path.join(directory, MANIFEST)}: shard file"))


def verify_manifest(directory: str | os.PathLike) -> None:
    """Recomputes every shard's sha256 and compares it with the manifest; raises on mismatch."""
    man = read_manifest(directory)
    for s in man["shards"]:
        path = _shard_path(os.fspath(directory), s)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != s["sha256"]:
            raise RecordCorruptError(f"{path}: sha256 {h.hexdigest()} differs from the manifest's {s['sha256']}")


def write_shards(payloads: Iterable[bytes], out_dir: str | os.PathLike, num_shards: int, *,
                 prefix: str = "data", extra: dict | None = None) -> dict:
    """Writes payloads round-robin into ``num_shards`` shards and a manifest; returns the manifest."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    writers = [TFRecordWriter(os.path.join(out_dir, f"{prefix}-{k:05d}-of-{num_shards:05d}.tfrecord"))
               for k in range(num_shards)]
    n = 0
    try:
        for n, data in enumerate(payloads, start=1):
            writers[(n - 1) % num_shards].write(data)
    except BaseException:
        for w in writers:  # leave no temporary shards behind
            w.__exit__(RuntimeError, None, None)
        raise
    entries = [w.close() for w in writers]
    man = {"format": FORMAT, "num_records": n, "shards": entries, "crc32c_backend": crc_backend(),
           **(extra or {})}
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(man, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))
    return man


def sample_features(sample_id: str, kind: str, conversations: Sequence[dict], media: Sequence[bytes] = (),
                    *, source: str = "", frame_names: Sequence[str] = (),
                    media_sizes: Sequence[tuple[int, int]] = ()) -> bytes:
    """Serialises one training sample. ``kind``: image | video | text; ``media``: encoded JPEG/PNG per frame.

    ``media_sizes`` are (height, width) of each media item.
    """
    if kind not in ("image", "video", "text"):
        raise ValueError(f"sample {sample_id!r}: kind must be image/video/text, got {kind!r}")
    feats: dict[str, Any] = {
        "id": [sample_id], "kind": [kind], "source": [source],
        "conversations": [json.dumps(list(conversations), ensure_ascii=False)],
        "media": [bytes(m) for m in media],
        "frame_names": list(frame_names),
        "media_sizes": np.asarray(media_sizes, dtype=np.int64).reshape(-1),
    }
    return encode_example(feats)


def parse_sample(data: bytes) -> dict:
    """Inverse of ``sample_features``: id, kind, source (str), conversations (list), media (list[bytes]),
    frame_names (list[str]), media_sizes [n, 2] int64.

    A payload that is not such a sample raises RecordCorruptError naming the feature."""
    try:
        ex = decode_example(data)
    except ValueError as e:  # truncated varints, overrunning fields, keys that are not UTF-8
        raise RecordCorruptError(f"not a tf.train.Example ({e})") from e

    def bytes_list(k: str) -> list[bytes]:
        val = ex.get(k, [])
        if isinstance(val, np.ndarray) and val.size == 0:  # an empty list is written as an empty int64 list
            return []
        if not isinstance(val, list):
            raise RecordCorruptError(f"feature {k!r} must be a bytes list")
        return val

    def strings(k: str) -> list[str]:
        try:
            return [b.decode() for b in bytes_list(k)]
        except UnicodeDecodeError as e:
            raise RecordCorruptError(f"feature {k!r} is not UTF-8 ({e.reason})") from e

    first = lambda k: (strings(k) or [""])[0]
    try:
        conversations = json.loads(first("conversations") or "[]")
    except (ValueError, RecursionError) as e:
        raise RecordCorruptError(f"feature 'conversations' is not JSON ({type(e).__name__}: {str(e)[:120]})") from e
    if not isinstance(conversations, list):
        raise RecordCorruptError("feature 'conversations' must hold a JSON list")
    media = bytes_list("media")
    sizes = ex.get("media_sizes", np.zeros(0, np.int64))
    if not isinstance(sizes, np.ndarray) or sizes.dtype != np.int64 or sizes.size % 2:
        raise RecordCorruptError("feature 'media_sizes' must be an even number of int64 values")
    return {
        "id": first("id"), "kind": first("kind"), "source": first("source"),
        "conversations": conversations, "media": list(media), "frame_names": strings("frame_names"),
        "media_sizes": sizes.reshape(-1, 2),
    }
