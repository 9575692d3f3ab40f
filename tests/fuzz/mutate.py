"""Hypothesis strategies that mutate valid seed documents: JSON trees, JSON Lines, raw bytes.

A structural mutation picks a node of the seed's JSON tree and deletes it, replaces it by a hostile value
(wrong type, huge / negative / non-finite number, empty / huge / control-character / escaping-path string,
lone surrogate, deep nesting), renames a key, grafts another part of the document there, or repeats a list
element. A byte mutation then optionally flips, inserts, deletes or truncates bytes of the serialised text
(invalid UTF-8, broken JSON). Everything is drawn through Hypothesis, so failures shrink to few mutations.
"""
from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import strategies as st

# Placeholders replaced in the serialised text by literals json.dumps cannot produce.
BIGINT = "@@FUZZ-BIGINT@@"  # an integer of 5000 digits (beyond Python's int <-> str limit)
DEEP = "@@FUZZ-DEEP@@"  # 100000 nested arrays (beyond the JSON parser's recursion limit)
_RAW = {json.dumps(BIGINT): "9" * 5000, json.dumps(DEEP): "[" * 100_000 + "]" * 100_000}

NASTY_STRINGS = [
    "", " ", "0", "-1", "1,2", "²", "٣", "1" * 40, "../../../../etc/passwd", "../outside.png", "/etc/passwd",
    "/", ".", "..", "~", "C:\\Windows\\win.ini", "\\\\server\\share\\x", "a\x00b", "\x00", "x" * 300,
    "a/" * 2100, "\ud800", "\udcff", "\x1b[31m\r\n\t", "%s%n{0}{}", "<st>a<ed>[0, 0, 2, 2]", "[99]", "<999>",
    "data:image/png;base64,!!!", "file:///etc/passwd", "NaN", "null", "true", "\u202e\ufeff", "é" * 200,
    "escape_link/o.png", "notimage.txt", "bad.png", "images/bad.png", "vid", "img.png", BIGINT, DEEP,
]
NASTY_NUMBERS = [0, -1, 1, 2, 3, 255, 256, 65536, 2**31, 2**63, 2**64, -(2**63), 10**30, 1e308, -1e308,
                 0.5, -0.0, 1e-320, float("nan"), float("inf"), float("-inf")]

scalars = st.one_of(
    st.sampled_from(NASTY_STRINGS),
    st.sampled_from(NASTY_NUMBERS),
    st.sampled_from([None, True, False]),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
hostile = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                       max_leaves=6)


def paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every node path of a JSON tree (the root is ``()``)."""
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += paths(v, prefix + (i,))
    return out


def keys_of(tree: Any) -> list[str]:
    """Every dict key of a JSON tree (so mutations can put known field names in the wrong place)."""
    out: list[str] = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += [k, *keys_of(v)]
    elif isinstance(tree, list):
        for v in tree:
            out += keys_of(v)
    return out


def _get(tree: Any, path: tuple) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(tree, path[:-1])[path[-1]] = value
    return tree


OPS = ("replace", "delete", "rename", "insert", "graft", "repeat", "wrap", "string", "number")


@st.composite
def mutate_tree(draw, tree: Any, max_ops: int = 4) -> Any:
    """``tree`` (a JSON value) after 0..max_ops structural mutations."""
    tree = copy.deepcopy(tree)
    for _ in range(draw(st.integers(0, max_ops))):
        all_paths = paths(tree)
        path = all_paths[draw(st.integers(0, len(all_paths) - 1))]
        node = _get(tree, path)
        op = draw(st.sampled_from(OPS))
        if op == "replace":
            tree = _set(tree, path, draw(hostile))
        elif op == "delete" and path:
            parent = _get(tree, path[:-1])
            del parent[path[-1]]
        elif op == "rename" and path and isinstance(path[-1], str):
            parent = _get(tree, path[:-1])
            new = draw(st.one_of(st.sampled_from(keys_of(tree) or ["k"]), st.sampled_from(NASTY_STRINGS)))
            parent[new] = parent.pop(path[-1])
        elif op == "insert" and isinstance(node, dict):
            node[draw(st.one_of(st.sampled_from(keys_of(tree) or ["k"]), st.text(max_size=6)))] = draw(hostile)
        elif op == "insert" and isinstance(node, list):
            node.insert(draw(st.integers(0, len(node))), draw(hostile))
        elif op == "graft":
            other = all_paths[draw(st.integers(0, len(all_paths) - 1))]
            tree = _set(tree, path, copy.deepcopy(_get(tree, other)))
        elif op == "repeat" and isinstance(node, list) and node:
            node.extend(copy.deepcopy(node[draw(st.integers(0, len(node) - 1))])
                        for _ in range(draw(st.integers(1, 40))))
        elif op == "wrap":
            tree = _set(tree, path, draw(st.sampled_from([[node], {"x": node}, json.dumps(node)])))
        elif op == "string" and isinstance(node, str):
            i = draw(st.integers(0, len(node)))
            piece = draw(st.one_of(st.sampled_from(NASTY_STRINGS), st.text(max_size=8)))
            tree = _set(tree, path, draw(st.sampled_from([node[:i] + piece + node[i:], node[:i], piece + node,
                                                          node * draw(st.integers(2, 50))])))
        elif op == "number" and isinstance(node, int | float) and not isinstance(node, bool):
            tree = _set(tree, path, draw(st.sampled_from([-node, node + 1, node - 1, node * 1000, str(node),
                                                          float(node), 0])))
    return tree


def dumps(tree: Any, ensure_ascii: bool = True) -> bytes:
    """JSON bytes of ``tree`` with the BIGINT / DEEP placeholders expanded."""
    text = json.dumps(tree, ensure_ascii=ensure_ascii)
    for mark, raw in _RAW.items():
        text = text.replace(mark, raw)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def mutate_bytes(draw, data: bytes, max_ops: int = 3) -> bytes:
    """``data`` after 0..max_ops byte mutations (flip, insert, delete, truncate, overwrite)."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, max_ops))):
        i = draw(st.integers(0, len(buf)))
        op = draw(st.sampled_from(("flip", "insert", "delete", "truncate", "overwrite")))
        if op == "flip" and i < len(buf):
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            buf[i:i] = draw(st.one_of(st.binary(min_size=1, max_size=8),
                                      st.sampled_from([b"\xff\xfe", b"\xc3", b"\x00", b"{", b"]", b'"', b"\n",
                                                       b"-", b"9" * 30, b"1e999", b"NaN"])))
        elif op == "delete" and buf:
            del buf[i:i + draw(st.integers(1, 16))]
        elif op == "truncate":
            del buf[i:]
        elif op == "overwrite" and i < len(buf):
            buf[i] = draw(st.integers(0, 255))
    return bytes(buf)


@st.composite
def json_document(draw, seed: Any, *, max_ops: int = 4, byte_ops: bool = True) -> bytes:
    """A mutated JSON file: structure mutated, then (one time in four) bytes mutated."""
    data = dumps(draw(mutate_tree(seed, max_ops)), ensure_ascii=draw(st.booleans()))
    if byte_ops and draw(st.integers(0, 3)) == 0:
        data = draw(mutate_bytes(data))
    return data


@st.composite
def jsonl_document(draw, seed_lines: list, *, max_ops: int = 4, byte_ops: bool = True) -> bytes:
    """A mutated JSON Lines file: the list of line values mutated as one tree, one value per line."""
    lines = draw(mutate_tree(seed_lines, max_ops))
    if not isinstance(lines, list):
        lines = [lines]
    ascii_ = draw(st.booleans())
    data = b"\n".join(dumps(v, ensure_ascii=ascii_) for v in lines) + b"\n"
    if byte_ops and draw(st.integers(0, 3)) == 0:
        data = draw(mutate_bytes(data))
    return data
