"""A restricted unpickler for CIFAR-100's pickle files.

The official files are Python-2 cPickle streams of dicts, lists, strings, ints and
one numpy uint8 array. Rebuilding that array needs exactly three globals (numpy's
`_reconstruct`, `ndarray` and `dtype`); Python 3 writers may also use `_frombuffer`
(protocol 5) or `_codecs.encode` (bytes under protocol 2). Every other global is
refused *before* it is looked up, so a crafted file cannot call anything: the
unpickler never gets a callable to call.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO

import numpy as np

from cifarray.errors import DataError

# Resolve numpy's reconstructors from live objects rather than by module path:
# numpy 2 moved numpy.core to numpy._core, but files name the old path.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


def _encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes under protocol 2 as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode called with unexpected arguments")
    return text.encode("latin1")


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _encode,
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global that CIFAR-100 files never contain."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def safe_load(stream: BinaryIO | bytes, *, source: str) -> Any:
    """Unpickle `stream` allowing only what CIFAR-100 files need.

    `source` names the file in error messages. Python-2 `str` values are read as
    bytes (encoding="bytes"), which is how the official CIFAR page reads them and
    avoids a latin-1 round trip of the 150 MB pixel string.
    """
    if isinstance(stream, (bytes, bytearray)):
        stream = io.BytesIO(stream)
    try:
        return _RestrictedUnpickler(stream, encoding="bytes").load()
    except RefusedGlobal as exc:
        raise DataError(
            f"{source}: refused to load: the pickle references {exc.module}.{exc.name}, which CIFAR-100 "
            "files never contain (the file may be malicious); replace it with the official file"
        ) from None
    except EOFError:
        raise DataError(f"{source}: file is truncated (pickle ended early); re-download or regenerate it") from None
    except (pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError) as exc:
        if "truncated" in str(exc):
            raise DataError(f"{source}: file is truncated ({exc}); re-download or regenerate it") from None
        raise DataError(f"{source}: file is corrupt and cannot be read ({exc}); re-download or regenerate it") from None
