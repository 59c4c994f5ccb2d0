"""Cheap image-distribution statistics that need no pretrained network.

`stats_fd` is the Fréchet distance between Gaussians fitted to a few low-order
features per image (channel means and spreads, saturation, edge energy). It is not
FID and is never reported as FID: it is a sanity signal (do generated images
move toward the data's colour, contrast and texture statistics?) that works
offline, without Inception weights.
"""

from __future__ import annotations

import numpy as np
import torch


def image_features(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) images in [0, 1] -> (N, 9) features."""
    x = images.float()
    mean = x.mean(dim=(2, 3))
    std = x.std(dim=(2, 3))
    sat = (x.amax(1) - x.amin(1)).mean(dim=(1, 2), keepdim=False).unsqueeze(1)
    gx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3)).unsqueeze(1)
    gy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3)).unsqueeze(1)
    return torch.cat([mean, std, sat, gx, gy], 1).double().cpu().numpy()


def stats_fd(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of `image_features` of two image sets in [0, 1]."""
    from scipy import linalg

    fa, fb = image_features(a), image_features(b)
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    ca, cb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = np.real(linalg.sqrtm(ca @ cb))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))
