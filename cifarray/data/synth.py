"""A learnable 100-class procedural data set in CIFAR-100's exact on-disk format.

Class = (pattern, hue): 10 spatial patterns x 10 foreground hues 36 degrees apart,
on a grey background with per-sample jitter (phase, position, size, colour,
brightness, pixel noise). Design choices that make it a useful test set:

- Every pattern is symmetric under horizontal flips and survives 4-pixel crops,
  so the standard augmentations keep labels valid.
- The background is grey and all colour lives in the hue, and no hue maps to
  itself when colour planes are permuted: a loader that swaps R and B, or reads
  the 3072 bytes as interleaved RGB instead of planes, sees the wrong classes.
- Coarse label = fine // 5 (pattern, warm/cool hue half), like CIFAR-100's 20
  super-classes of 5.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cifarray.data.cifar import FOLDER, NUM_FINE, SYNTH_MARKER
from cifarray.data.py2pickle import dumps_py2
from cifarray.errors import UserError

PATTERNS = ("hstripes", "hstripes_fine", "vstripes", "vstripes_fine", "checker",
            "rings", "disc", "dots", "xcross", "plus")
HUES = ("red", "orange", "yellow", "lime", "green", "teal", "sky", "blue", "violet", "magenta")
FINE_NAMES = [f"{p}_{h}" for p in PATTERNS for h in HUES]
COARSE_NAMES = [f"{p}_{half}" for p in PATTERNS for half in ("warm", "cool")]

_YY, _XX = np.mgrid[0:32, 0:32].astype(np.float32)


def _mask(pattern: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 32, 32) soft masks in [0, 1] for one pattern, each with its own random parameters."""
    def u(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, size=(n, 1, 1)).astype(np.float32)

    y, x = _YY[None], _XX[None]
    cy, cx = u(10, 22), u(10, 22)
    name = PATTERNS[pattern]
    if name in ("hstripes", "hstripes_fine", "vstripes", "vstripes_fine"):
        period = u(7, 9) if not name.endswith("fine") else u(3.6, 4.4)
        coord = y if name.startswith("h") else x
        m = 0.5 + 0.5 * np.sin(2 * np.pi * coord / period + u(0, 2 * np.pi))
    elif name == "checker":
        period = u(7, 9)
        m = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * (y - cy) / period) * np.sin(2 * np.pi * (x - cx) / period))
    elif name == "rings":
        r = np.hypot(y - cy, x - cx)
        m = 0.5 + 0.5 * np.sin(2 * np.pi * r / u(5, 7))
    elif name == "disc":
        r = np.hypot(y - cy, x - cx)
        m = np.clip(u(6, 10) - r, 0, 1)
    elif name == "dots":
        period = u(6, 8)
        dy = (y - cy + period / 2) % period - period / 2
        dx = (x - cx + period / 2) % period - period / 2
        m = np.clip(2.2 - np.hypot(dy, dx), 0, 1)
    elif name == "xcross":
        m = np.clip(2.0 - np.minimum(np.abs((y - cy) - (x - cx)), np.abs((y - cy) + (x - cx))) / 1.4, 0, 1)
    else:  # plus
        m = np.clip(2.5 - np.minimum(np.abs(y - cy), np.abs(x - cx)), 0, 1)
    return np.broadcast_to(m, (n, 32, 32)).astype(np.float32)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (h in degrees) to RGB in [0, 1]; returns (..., 3)."""
    k = lambda n: (n + h / 60.0) % 6  # noqa: E731
    f = lambda n: v - v * s * np.clip(np.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return np.stack([f(5), f(3), f(1)], axis=-1)


def make_class(fine: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3, 32, 32) uint8 images of one class."""
    pattern, hue = divmod(fine, len(HUES))
    m = _mask(pattern, n, rng)[:, None]  # (n, 1, 32, 32)
    h = hue * 36.0 + rng.uniform(-6, 6, n)
    fg = _hsv_to_rgb(h, rng.uniform(0.65, 0.95, n), rng.uniform(0.7, 1.0, n)) * 255  # (n, 3)
    bg = rng.uniform(15, 110, n)[:, None].repeat(3, axis=1)  # grey: carries no colour
    img = bg[:, :, None, None] * (1 - m) + fg[:, :, None, None] * m
    img += rng.normal(0, 10, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_split(per_class: int, rng: np.random.Generator, tag: str) -> dict:
    """A shuffled split as the dict CIFAR-100's pickles hold."""
    images = np.concatenate([make_class(c, per_class, rng) for c in range(NUM_FINE)])
    fine = np.repeat(np.arange(NUM_FINE), per_class)
    order = rng.permutation(len(fine))
    images, fine = images[order], fine[order]
    return {
        "filenames": [f"{FINE_NAMES[c]}_s_{i:06d}.png" for i, c in enumerate(fine)],
        "batch_label": f"{tag} batch 1 of 1",
        "fine_labels": fine.tolist(),
        "coarse_labels": (fine // 5).tolist(),
        "data": images.reshape(len(fine), 3072),  # R plane, G plane, B plane per row
    }


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_synthetic(out_dir: str | Path, *, train_per_class: int = 500, test_per_class: int = 100,
                    seed: int = 0, force: bool = False) -> Path:
    """Write OUT_DIR/cifar-100-python/{train,test,meta} and a marker; returns the data folder.

    Refuses to touch a folder that holds data it did not write, and regenerates
    its own only when the parameters differ (or `force`).
    """
    if train_per_class < 1 or test_per_class < 1:
        raise UserError("--train-per-class and --test-per-class must be at least 1")
    out = Path(out_dir).expanduser()
    folder, marker = out / FOLDER, out / SYNTH_MARKER
    params = {"generator": "cifarray.data.synth", "version": 1, "seed": seed,
              "train_per_class": train_per_class, "test_per_class": test_per_class}
    if folder.exists():
        if not marker.is_file():
            raise UserError(f"{folder} already exists and was not written by `cifarray.data synth`; "
                            "choose another OUT_DIR (nothing was changed)")
        if json.loads(marker.read_text()) == params and all((folder / n).is_file() for n in ("train", "test", "meta")):
            return folder
        if not force:
            raise UserError(f"{out} holds procedural data made with other parameters; pass --force to replace it "
                            "or choose another OUT_DIR")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    marker.unlink(missing_ok=True)  # a half-written folder must not look complete
    _atomic_write(folder / "train", dumps_py2(make_split(train_per_class, rng, "training")))
    _atomic_write(folder / "test", dumps_py2(make_split(test_per_class, rng, "testing")))
    _atomic_write(folder / "meta", dumps_py2({"fine_label_names": FINE_NAMES, "coarse_label_names": COARSE_NAMES}))
    marker.write_text(json.dumps(params, indent=2) + "\n")
    return folder
