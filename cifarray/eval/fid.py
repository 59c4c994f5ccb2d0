"""FID/IS/KID with torch-fidelity, on our own data and generators, never downloading data.

Inception weights come from, in order: an explicit path, torch hub's cache, a
download (where internet exists). torch-fidelity unpickles its weights file with
`weights_only=False`, so a user-supplied file is first read with `weights_only=True`
(which refuses code) and a clean copy that we wrote is what torch-fidelity loads.
Reference statistics are cached under a name made of the split's content hash and
the weights' hash, so repeated evaluations extract features of generated images only.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from cifarray.errors import UserError
from cifarray.phases import mark

WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[1]
DEFAULT_SAMPLES = 10_000  # the usual course protocol


def cache_dir() -> Path:
    d = Path(os.environ.get("CIFARRAY_CACHE", Path(torch.hub.get_dir()).parent / "cifarray"))
    d.mkdir(parents=True, exist_ok=True)
    return d


class UInt8Images(Dataset):
    """(N, 3, H, W) uint8 images as torch-fidelity wants them: one uint8 tensor per item."""

    def __init__(self, images: torch.Tensor | np.ndarray):
        self.images = torch.as_tensor(images)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W) uint8 images, got {self.images.dtype} {tuple(self.images.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class InceptionWeights(NamedTuple):
    path: Path  # our safe copy, the file torch-fidelity loads
    sha256: str  # of the original file: names the safe copy and the cached reference statistics


def resolve_weights(path: str | Path | None) -> InceptionWeights:
    """Find, check and safely copy the Inception weights, once per run: hashing them reads ~100 MB."""
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    if path is not None:
        source = Path(path).expanduser()
        if not source.is_file():
            raise UserError(f"--inception-weights {source}: no such file; pass the path of {WEIGHTS_FILE}")
    elif hub_file.is_file():
        source = hub_file
    else:
        try:
            if os.environ.get("CIFARRAY_OFFLINE"):  # air-gapped clusters: fail now, not after a network timeout
                raise ConnectionError("CIFARRAY_OFFLINE is set")
            hub_file.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(WEIGHTS_URL, str(hub_file), progress=False)
        except Exception as exc:  # no internet, proxy, DNS: all mean the same to the user
            hub_file.unlink(missing_ok=True)
            raise UserError(
                f"Inception weights for FID are not available offline and could not be downloaded ({type(exc).__name__}); "
                f"put {WEIGHTS_FILE} in {hub_file.parent}/ or pass --inception-weights PATH") from None
        source = hub_file
    digest = _sha256(source)
    safe = cache_dir() / f"inception-{digest[:16]}.pt"
    if not safe.is_file():
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)  # refuses anything but tensors
        except Exception as exc:
            raise UserError(f"{source}: not a plain PyTorch weights file ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]}); pass the real {WEIGHTS_FILE}") from None
        if not isinstance(state, dict) or "Conv2d_1a_3x3.conv.weight" not in state:
            raise UserError(f"{source}: not InceptionV3 weights in torch-fidelity's layout; pass {WEIGHTS_FILE}")
        tmp = safe.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, safe)
    return InceptionWeights(safe, digest)


def reference_name(images: np.ndarray, split: str, weights_sha: str) -> str:
    content = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
    return f"cifarray-{split}-{content}-inception-{weights_sha[:12]}"


def compute(generated: torch.Tensor, reference: np.ndarray, *, split: str, weights: InceptionWeights,
            isc: bool = False, kid: bool = False, batch_size: int = 200) -> dict[str, float]:
    """FID (and optionally IS, KID) of uint8 `generated` against uint8 `reference` images."""
    import torch_fidelity

    kid_subset = min(1000, len(generated), len(reference))
    mark("fid")
    metrics = torch_fidelity.calculate_metrics(
        input1=UInt8Images(generated), input2=UInt8Images(reference), fid=True, isc=isc, kid=kid,
        kid_subset_size=kid_subset, feature_extractor_weights_path=str(weights.path),
        cache_root=str(cache_dir() / "fidelity"), input2_cache_name=reference_name(reference, split, weights.sha256),
        cuda=torch.cuda.is_available(), batch_size=batch_size, verbose=False, save_cpu_ram=True)
    mark("fid_done")
    out = {"fid": float(metrics["frechet_inception_distance"])}
    if isc:
        out["isc"] = float(metrics["inception_score_mean"])
    if kid:
        out["kid"] = float(metrics["kernel_inception_distance_mean"])
    return out


@torch.no_grad()
def sample_generator(generator: torch.nn.Module, n: int, z_dim: int, seed: int = 0,
                     batch: int = 500) -> torch.Tensor:
    """n uint8 samples (N, 3, 32, 32) from a tanh generator, from seeded noise."""
    g = torch.Generator().manual_seed(seed)
    device = next(generator.parameters()).device
    was = generator.training
    generator.eval()
    out = []
    for start in range(0, n, batch):
        z = torch.randn(min(batch, n - start), z_dim, generator=g).to(device)
        out.append(((generator(z).float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu())
    generator.train(was)
    return torch.cat(out)
