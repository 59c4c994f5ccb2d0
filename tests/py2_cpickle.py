"""Bytes as Python 2.7's cPickle (protocol 2) laid out the real CIFAR-100 files.

Deliberately independent of cifarray's own writer: it follows the opcode stream
of the official files byte for byte in structure (memo BINPUT/LONG_BINPUT indices
counting from 1, lists appended in batches of 1000, the numpy 1.x reduce of a
uint8 array with its pixel buffer as one BINSTRING), so a loader that only
understands our writer's output would fail on it. No Python 2 interpreter is
available to produce the real thing; this is the next best witness.
"""

from __future__ import annotations

import struct

import numpy as np


class _Memo:
    def __init__(self) -> None:
        self.next = 1  # cPickle's memo ids start at 1

    def put(self) -> bytes:
        i = self.next
        self.next += 1
        return b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)


def _s(raw: bytes, memo: _Memo, memoize: bool = True) -> bytes:
    head = b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<I", len(raw))
    return head + raw + (memo.put() if memoize else b"")


def _i(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    return b"J" + struct.pack("<i", v)


def _list(make_items, memo: _Memo) -> bytes:
    out = b"]" + memo.put()  # the list is memoised before its items, as cPickle does
    items = make_items()
    for start in range(0, len(items), 1000):
        out += b"(" + b"".join(items[start:start + 1000]) + b"e"
    return out


def _array(a: np.ndarray, memo: _Memo) -> bytes:
    rows, cols = a.shape
    out = b"cnumpy.core.multiarray\n_reconstruct\n" + memo.put() + b"cnumpy\nndarray\n" + memo.put()
    out += b"K\x00\x85" + _s(b"b", memo, memoize=False) + b"\x87R" + memo.put()
    out += b"(K\x01" + _i(rows) + _i(cols) + b"\x86"
    out += b"cnumpy\ndtype\n" + memo.put() + _s(b"u1", memo, memoize=False) + b"K\x00K\x01\x87R" + memo.put()
    out += b"(K\x03" + _s(b"|", memo, memoize=False) + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    out += b"\x89" + _s(a.tobytes(), memo, memoize=False) + b"tb"
    return out


def split_file(data: np.ndarray, fine: list[int], coarse: list[int], label: str) -> bytes:
    """A train/test file: {'filenames', 'batch_label', 'fine_labels', 'coarse_labels', 'data'}."""
    memo = _Memo()
    out = b"\x80\x02}" + memo.put() + b"("
    out += _s(b"filenames", memo) + _list(lambda: [_s(f"img_{i:05d}.png".encode(), memo) for i in range(len(fine))], memo)
    out += _s(b"batch_label", memo) + _s(label.encode(), memo)
    out += _s(b"fine_labels", memo) + _list(lambda: [_i(v) for v in fine], memo)
    out += _s(b"coarse_labels", memo) + _list(lambda: [_i(v) for v in coarse], memo)
    out += _s(b"data", memo) + _array(data, memo)
    return out + b"u."


def meta_file(fine_names: list[str], coarse_names: list[str]) -> bytes:
    memo = _Memo()
    out = b"\x80\x02}" + memo.put() + b"("
    out += _s(b"fine_label_names", memo) + _list(lambda: [_s(n.encode(), memo) for n in fine_names], memo)
    out += _s(b"coarse_label_names", memo) + _list(lambda: [_s(n.encode(), memo) for n in coarse_names], memo)
    return out + b"u."
