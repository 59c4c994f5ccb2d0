"""CIFAR-100 "python version": locate, verify, load, validate, download, split.

On disk the data set is `cifar-100-python/{train,test,meta}` (or the tarball that
holds them): Python-2 pickles of dicts whose `data` is an N x 3072 uint8 array of
32x32 R, then G, then B planes. Files are read through `safe_load`, checked
against the official md5 sums unless `verify=False`, and always validated for
structure (shapes, dtype, label ranges, meta names), so that a bad file is a
one-line error that names it and never a silent mistake.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifarray.data.safe_pickle import safe_load
from cifarray.errors import DataError

FOLDER = "cifar-100-python"
TARBALL = "cifar-100-python.tar.gz"
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
TARBALL_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
NUM_FINE, NUM_COARSE = 100, 20
IMAGE_SHAPE = (3, 32, 32)
SYNTH_MARKER = "cifarray-synth.json"  # written beside cifar-100-python/ by `cifarray.data synth`


@dataclass(frozen=True)
class Split:
    """Images as (N, 3, 32, 32) uint8 and their labels as int64 arrays."""

    images: np.ndarray
    fine_labels: np.ndarray
    coarse_labels: np.ndarray

    def __len__(self) -> int:
        return len(self.fine_labels)

    def subset(self, index: np.ndarray) -> "Split":
        return Split(self.images[index], self.fine_labels[index], self.coarse_labels[index])


@dataclass(frozen=True)
class Cifar100:
    train: Split
    test: Split
    fine_names: list[str]
    coarse_names: list[str]
    source: str  # folder or tarball the data came from
    verified: bool  # md5 of every file matched the official release
    synthetic: bool  # written by `cifarray.data synth`


def md5_of(data: bytes | Path) -> str:
    h = hashlib.md5()
    if isinstance(data, Path):
        with open(data, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    else:
        h.update(data)
    return h.hexdigest()


def locate(path: str | Path) -> Path:
    """Find the data: a `cifar-100-python/` folder, a folder holding it or its tarball, or the tarball."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            f"{p}: no such file or folder; give the folder that holds {FOLDER}/ or {TARBALL} "
            f"(`python -m cifarray.data download {p}` fetches it where internet exists, "
            "or use --synthetic for procedural data)"
        )
    if p.is_file():
        if p.name.endswith((".tar.gz", ".tgz")):
            return p
        raise DataError(f"{p}: not a folder or a .tar.gz; give the folder that holds {FOLDER}/ or {TARBALL}")
    for candidate in (p / FOLDER, p, p / TARBALL):
        if candidate.is_dir() and all((candidate / n).is_file() for n in MD5):
            return candidate
        if candidate.is_file():
            return candidate
    if (p / FOLDER).is_dir() or p.name == FOLDER:
        folder = p / FOLDER if (p / FOLDER).is_dir() else p
        missing = [n for n in MD5 if not (folder / n).is_file()]
        raise DataError(f"{folder}: missing {', '.join(missing)}; re-extract {TARBALL} or regenerate the folder")
    raise DataError(
        f"{p}: no {FOLDER}/ folder or {TARBALL} here; download it (`python -m cifarray.data download {p}`) "
        "or pass the right --data-dir"
    )


def _read_files(where: Path) -> dict[str, tuple[str, bytes]]:
    """Return {name: (display path, raw bytes)} for train/test/meta from a folder or tarball."""
    out: dict[str, tuple[str, bytes]] = {}
    if where.is_dir():
        for name in MD5:
            f = where / name
            out[name] = (str(f), f.read_bytes())
        return out
    try:
        with tarfile.open(where, "r:gz") as tar:
            # Read members in memory: nothing is extracted, so no path in the archive can escape.
            for name in MD5:
                try:
                    member = tar.getmember(f"{FOLDER}/{name}")
                except KeyError:
                    raise DataError(f"{where}: archive has no {FOLDER}/{name}; re-download {TARBALL}") from None
                fh = tar.extractfile(member)
                if fh is None:
                    raise DataError(f"{where}: {FOLDER}/{name} is not a regular file; re-download {TARBALL}")
                out[name] = (f"{where}:{FOLDER}/{name}", fh.read())
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{where}: not a readable .tar.gz ({exc}); re-download {TARBALL}") from None
    return out


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _keys_to_str(d: Any, source: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise DataError(f"{source}: expected a dict in the pickle, found {type(d).__name__}; not a CIFAR-100 file")
    return {_text(k): v for k, v in d.items()}


def _labels(d: dict[str, Any], key: str, n: int, classes: int, source: str) -> np.ndarray:
    if key not in d:
        raise DataError(f"{source}: no '{key}' entry; not a CIFAR-100 file (CIFAR-10 has no fine/coarse labels)")
    try:
        labels = np.asarray(d[key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{source}: '{key}' is not a list of integers") from None
    if labels.shape != (n,):
        raise DataError(f"{source}: '{key}' has {labels.size} entries for {n} images; file is corrupt")
    if n and (labels.min() < 0 or labels.max() >= classes):
        bad = labels[(labels < 0) | (labels >= classes)][0]
        raise DataError(f"{source}: '{key}' has label {bad} out of range 0..{classes - 1}; file is corrupt")
    return labels


def parse_split(obj: Any, source: str) -> Split:
    d = _keys_to_str(obj, source)
    data = d.get("data")
    if not isinstance(data, np.ndarray):
        raise DataError(f"{source}: no 'data' array; not a CIFAR-100 file")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{source}: 'data' is {data.dtype} of shape {data.shape}, expected uint8 of shape (N, 3072); "
            "file is corrupt or not CIFAR-100"
        )
    n = data.shape[0]
    fine = _labels(d, "fine_labels", n, NUM_FINE, source)
    coarse = _labels(d, "coarse_labels", n, NUM_COARSE, source)
    # Row layout is 1024 R, then 1024 G, then 1024 B, each row-major 32x32.
    images = data.reshape(n, *IMAGE_SHAPE)
    return Split(images, fine, coarse)


def parse_meta(obj: Any, source: str) -> tuple[list[str], list[str]]:
    d = _keys_to_str(obj, source)
    names = []
    for key, count in (("fine_label_names", NUM_FINE), ("coarse_label_names", NUM_COARSE)):
        v = d.get(key)
        if not isinstance(v, list) or len(v) != count or not all(isinstance(x, (str, bytes)) for x in v):
            raise DataError(f"{source}: missing or malformed '{key}' (expected {count} names); file is corrupt")
        names.append([_text(x) for x in v])
    return names[0], names[1]


def _verify(where: Path, files: dict[str, tuple[str, bytes]]) -> None:
    fix = (
        "re-download the official data (`python -m cifarray.data download DIR`), "
        "or pass --no-verify to load another folder in the CIFAR-100 format"
    )
    if (where.parent / SYNTH_MARKER).is_file() or (where / SYNTH_MARKER).is_file():
        fix = "this folder holds procedural data from `cifarray.data synth`: pass --no-verify (or use --synthetic)"
    if where.is_file():
        got = md5_of(where)
        if got != TARBALL_MD5:
            raise DataError(f"{where}: md5 {got} is not the official {TARBALL} ({TARBALL_MD5}); {fix}")
    for name, (shown, raw) in files.items():
        got = md5_of(raw)
        if got != MD5[name]:
            raise DataError(f"{shown}: md5 {got} is not the official CIFAR-100 {name} file ({MD5[name]}); {fix}")


def load_cifar100(path: str | Path, *, verify: bool = True) -> Cifar100:
    """Load CIFAR-100 from `path` (folder or tarball); md5-verify unless `verify=False`."""
    where = locate(path)
    files = _read_files(where)
    if verify:
        _verify(where, files)
    train = parse_split(safe_load(files["train"][1], source=files["train"][0]), files["train"][0])
    test = parse_split(safe_load(files["test"][1], source=files["test"][0]), files["test"][0])
    fine_names, coarse_names = parse_meta(safe_load(files["meta"][1], source=files["meta"][0]), files["meta"][0])
    root = where.parent if where.name in (FOLDER, TARBALL) else where
    return Cifar100(
        train=train,
        test=test,
        fine_names=fine_names,
        coarse_names=coarse_names,
        source=str(where),
        verified=verify,
        synthetic=(root / SYNTH_MARKER).is_file(),
    )


def download(root: str | Path) -> Path:
    """Download and md5-check the official tarball into `root`; returns its path. Needs internet."""
    import urllib.error
    import urllib.request

    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    target = root / TARBALL
    if target.is_file() and md5_of(target) == TARBALL_MD5:
        return target
    partial = target.with_suffix(".part")
    try:
        with urllib.request.urlopen(URL, timeout=30) as resp, open(partial, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
                done += len(chunk)
                if total:
                    print(f"\rdownloading {TARBALL}: {100 * done // total:3d}%", end="", flush=True)
            print()
    except (urllib.error.URLError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise DataError(
            f"could not download {URL} ({getattr(exc, 'reason', exc)}); on a machine with internet download it "
            f"and copy {TARBALL} into {root}"
        ) from None
    got = md5_of(partial)
    if got != TARBALL_MD5:
        partial.unlink(missing_ok=True)
        raise DataError(f"downloaded {TARBALL} has md5 {got}, expected {TARBALL_MD5}; try again")
    partial.replace(target)  # only a complete, verified file takes the real name
    return target


def validation_split(n_train: int, val_size: int = 5000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train_index, val_index) carved from the training set; the test split is never touched."""
    if not 0 <= val_size < n_train:
        raise DataError(f"validation size {val_size} must be between 0 and {n_train - 1} (the training set size - 1)")
    perm = np.random.default_rng(seed).permutation(n_train)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of (N, 3, H, W) uint8 images (for normalisation)."""
    x = images.reshape(images.shape[0], 3, -1)
    mean = [float(x[:, c].mean(dtype=np.float64)) / 255 for c in range(3)]
    std = [float(x[:, c].std(dtype=np.float64)) / 255 for c in range(3)]
    return tuple(mean), tuple(max(s, 1e-3) for s in std)
