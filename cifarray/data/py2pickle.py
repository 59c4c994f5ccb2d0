"""Write pickles the way Python 2's cPickle (protocol 2) wrote CIFAR-100.

Python 3's pickler writes `str` as unicode; Python 2 wrote it as a byte string
(SHORT_BINSTRING/BINSTRING), and its numpy pickled arrays through
`numpy.core.multiarray._reconstruct` with the pixel buffer as a byte string.
Loaders must cope with exactly that, so the procedural data set is written the
same way. Only the types CIFAR-100 files contain are supported.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

PROTO2 = b"\x80\x02"
STOP = b"."
MARK = b"("
EMPTY_DICT, SETITEMS = b"}", b"u"
EMPTY_LIST, APPENDS = b"]", b"e"
TUPLE, TUPLE_N = b"t", {1: b"\x85", 2: b"\x86", 3: b"\x87"}
NONE, NEWTRUE, NEWFALSE = b"N", b"\x88", b"\x89"
REDUCE, BUILD = b"R", b"b"
GLOBAL = b"c"


def _int(v: int) -> bytes:
    if 0 <= v < 0x100:
        return b"K" + bytes([v])
    if 0 <= v < 0x10000:
        return b"M" + struct.pack("<H", v)
    return b"J" + struct.pack("<i", v)


def _string(raw: bytes) -> bytes:
    # A Python 2 `str` is bytes; both short and long forms occur in the real files.
    if len(raw) < 0x100:
        return b"U" + bytes([len(raw)]) + raw
    return b"T" + struct.pack("<I", len(raw)) + raw


def _dtype(dt: np.dtype) -> bytes:
    if dt.byteorder not in ("|", "="):
        raise TypeError(f"only native/byte-order-free dtypes are supported, got {dt}")
    args = _string(dt.str[1:].encode()) + _int(0) + _int(1) + TUPLE_N[3]
    # dtype.__setstate__ layout numpy used for plain scalar dtypes (version 3).
    order = b"|" if dt.itemsize == 1 else b"<"
    state = (
        MARK + _int(3) + _string(order) + NONE + NONE + NONE
        + b"J" + struct.pack("<i", -1) + b"J" + struct.pack("<i", -1) + _int(0) + TUPLE
    )
    return GLOBAL + b"numpy\ndtype\n" + args + REDUCE + state + BUILD


def _ndarray(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr)
    shape = b"".join(_int(n) for n in arr.shape)
    shape = shape + TUPLE_N[arr.ndim] if arr.ndim in TUPLE_N else MARK + shape + TUPLE
    head = (
        GLOBAL + b"numpy.core.multiarray\n_reconstruct\n"
        + GLOBAL + b"numpy\nndarray\n" + _int(0) + TUPLE_N[1] + _string(b"b") + TUPLE_N[3] + REDUCE
    )
    state = MARK + _int(1) + shape + _dtype(arr.dtype) + NEWFALSE + _string(arr.tobytes()) + TUPLE
    return head + state + BUILD


def _value(obj: Any) -> bytes:
    if obj is None:
        return NONE
    if isinstance(obj, bool):
        return NEWTRUE if obj else NEWFALSE
    if isinstance(obj, (int, np.integer)):
        return _int(int(obj))
    if isinstance(obj, str):
        return _string(obj.encode("utf-8"))
    if isinstance(obj, bytes):
        return _string(obj)
    if isinstance(obj, np.ndarray):
        return _ndarray(obj)
    if isinstance(obj, list):
        if not obj:
            return EMPTY_LIST
        return EMPTY_LIST + MARK + b"".join(_value(v) for v in obj) + APPENDS
    if isinstance(obj, dict):
        items = b"".join(_value(k) + _value(v) for k, v in obj.items())
        return EMPTY_DICT + (MARK + items + SETITEMS if obj else b"")
    raise TypeError(f"cannot write {type(obj).__name__} as a Python-2 pickle")


def dumps_py2(obj: Any) -> bytes:
    """Serialise `obj` (dict/list/str/bytes/int/uint8 ndarray) as a Python-2 protocol-2 pickle."""
    return PROTO2 + _value(obj) + STOP
