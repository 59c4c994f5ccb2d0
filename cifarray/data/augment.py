"""Batched augmentation on the training device: crop, flip, AugMix, normalise.

torchvision's v2 transforms work one image at a time on the CPU, and its AugMix
applies one op chain to a whole batch. Here every op takes per-sample parameters,
so a (B, 3, 32, 32) uint8 batch on the GPU (or CPU) is augmented in a few dozen
kernel launches with every sample drawing its own crop, flip, op chains and mixing
weights. The ops reproduce torchvision's semantics (same op set, magnitude bins,
affine conventions, uint8 rounding), which the tests check op by op against
`torchvision.transforms.v2.functional`; `reference_pipeline()` is the per-image
torchvision pipeline that the tests and `python -m cifarray.bench augment`
compare against.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cifarray.config import opt
from cifarray.errors import UserError

MODES = ("none", "basic", "augmix")

_AFFINE = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
PARAMETER_MAX = 10  # torchvision's number of magnitude bins - 1


@dataclass(frozen=True)
class AugmentConfig:
    """What `DeviceAugment` does to each training batch."""

    mode: str = opt("augmix", "none | basic (crop+flip) | augmix (crop+flip+AugMix)")
    pad: int = opt(4, "reflect padding of the random crop, pixels (0: no crop)")
    flip: bool = opt(True, "random horizontal flips, p=0.5 (basic and augmix)")
    severity: int = opt(3, "AugMix severity (1-10): magnitude bins 0..severity-1 of 11 (torchvision's default 3)")
    width: int = opt(3, "AugMix chains mixed")
    depth: int = opt(-1, "AugMix ops per chain; -1 draws 1..3 per chain and sample")
    alpha: float = opt(1.0, "AugMix Dirichlet/Beta concentration of the mixing weights")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"augment mode {self.mode!r} is not one of {', '.join(MODES)}")
        if not 0 <= self.pad <= 16:
            raise UserError(f"augment pad {self.pad} must be between 0 and 16 pixels")
        if not 1 <= self.severity <= PARAMETER_MAX:
            raise UserError(f"AugMix severity {self.severity} must be between 1 and {PARAMETER_MAX}")
        if self.width < 1 or self.depth == 0 or self.depth < -1 or self.alpha <= 0:
            raise UserError("AugMix needs width >= 1, depth -1 (random 1..3) or >= 1, and alpha > 0")


@functools.cache
def _augmix_space() -> dict:
    """AugMix's op table, taken from torchvision so that op set and magnitude bins stay identical.

    Imported on first use, not with this module: importing torchvision loads torch._dynamo (~2.5 s
    on 2 CPU cores), which the processes that import this module but build no optimizer (the CLI
    drivers, the tuner, each sweep trial's driver) would otherwise pay; torch.optim loads it anyway."""
    from torchvision.transforms import v2

    space = v2.AugMix._AUGMENTATION_SPACE
    names = tuple(space)
    assert names[: len(_AFFINE)] == _AFFINE and set(names[len(_AFFINE):]) == set(_OPS), names
    return space


def __getattr__(name: str):
    if name == "OP_NAMES":  # the op names, in torchvision's order (loads its table: see _augmix_space)
        return tuple(_augmix_space())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _magnitude_table(severity: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ops, severity) magnitudes and (ops,) signed flags, from torchvision's AugMix table."""
    mags, signed = [], []
    for name, (fn, is_signed) in _augmix_space().items():
        m = fn(PARAMETER_MAX + 1, height, width)
        mags.append(torch.zeros(severity) if m is None else m[:severity].float())
        signed.append(is_signed)
    return torch.stack(mags), torch.tensor(signed)


# --------------------------------------------------------------------------- crop / flip


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    # torch's "reflect" padding: -1 -> 1, size -> size - 2 (the edge pixel is not repeated).
    i = i.abs()
    return torch.where(i > size - 1, 2 * (size - 1) - i, i)


def crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect-pad by `pad`, crop at (top, left) of the padded image, then flip where `flip`; one gather.

    Equals torchvision's RandomCrop(size, padding=pad, padding_mode="reflect") followed by
    horizontal_flip for the same parameters. x is (B, C, H, W); top/left in [0, 2*pad].
    """
    b, c, h, w = x.shape
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], ar_w.flip(0)[None], ar_w[None])  # flip after crop = read columns reversed
    rows = _reflect(top[:, None] + ar_h[None] - pad, h)  # (B, H)
    cols = _reflect(left[:, None] + cols - pad, w)  # (B, W)
    index = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)


# --------------------------------------------------------------------------- AugMix ops
# Each op takes uint8 images (n, 3, H, W) and per-sample magnitudes (n,), and returns
# uint8, or float32 in [0, 255] that the caller casts to uint8, computed with
# torchvision's arithmetic (float32 maths; the cast truncates, as torchvision's
# does). The chain between ops is uint8, as in torchvision, which also keeps the
# per-step regrouping gathers 4x cheaper than in float.


def _affine_grid(op: torch.Tensor, m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """grid_sample grids (n, h, w, 2) of ShearX/ShearY/Rotate (op 0, 1, 4) with magnitudes m.

    torchvision's _get_inverse_affine_matrix and _affine_grid, vectorised over samples.
    """
    n, dev = op.shape[0], op.device
    m = m.double()
    zero = torch.zeros_like(m)
    shear = torch.rad2deg(torch.atan(m))
    rot = torch.deg2rad(torch.where(op == 4, -m, zero))  # rotate_image passes -angle
    sx = torch.deg2rad(torch.where(op == 0, shear, zero))
    sy = torch.deg2rad(torch.where(op == 1, shear, zero))
    is_shear = op <= 1  # shears use center=[0, 0], the top-left corner; rotations the centre
    cx = torch.where(is_shear, zero - w * 0.5, zero)
    cy = torch.where(is_shear, zero - h * 0.5, zero)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = cx - m0 * cx - m1 * cy
    m5 = cy - m3 * cx - m4 * cy
    t = [v.float().view(n, 1, 1) for v in (m0, m1, m2, m3, m4, m5)]
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=dev).view(1, 1, w)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=dev).view(1, h, 1)
    grid = torch.empty(n, h, w, 2, device=dev)
    torch.div(xs * t[0] + ys * t[1] + t[2], 0.5 * w, out=grid[..., 0])
    torch.div(xs * t[3] + ys * t[4] + t[5], 0.5 * h, out=grid[..., 1])
    return grid


def _grid_sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round_()


def _shift_index(op: torch.Tensor, m: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat source index (n, h*w) and inside-mask (n, 1, h*w) of TranslateX/Y (op 2, 3) by int(m).

    Bilinear sampling at an integer shift copies pixels exactly, so a gather equals
    torchvision's grid_sample path bit for bit at a fraction of its cost.
    """
    n, dev = op.shape[0], op.device
    shift = torch.trunc(m).to(torch.int64)  # affine gets translate=[int(magnitude), 0]
    tx = torch.where(op == 2, shift, 0).view(n, 1, 1)
    ty = torch.where(op == 3, shift, 0).view(n, 1, 1)
    rows = torch.arange(h, device=dev).view(1, h, 1) - ty  # out[y, x] = in[y - ty, x - tx]
    cols = torch.arange(w, device=dev).view(1, 1, w) - tx
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    index = rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)
    return index.view(n, h * w), inside.view(n, 1, h * w).to(torch.uint8)


def _shift(x: torch.Tensor, index: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    out = x.reshape(n, c, h * w).gather(2, index.unsqueeze(1).expand(n, c, h * w))
    return out.mul_(inside).view(n, c, h, w)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1).floor_()


def _ratios(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # torchvision gets factor = 1 + magnitude as a Python float and uses 1 - factor as alpha:
    # both are rounded to float32 from double, which keeps results bit-identical.
    f = 1.0 + m.double()
    return f.float().view(-1, 1, 1, 1), (1.0 - f).float().view(-1, 1, 1, 1)


def _blend(x: torch.Tensor, other: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    r, one_minus_r = _ratios(m)
    return (x * r).addcmul_(other, one_minus_r).clamp_(0, 255)


def _brightness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (x * _ratios(m)[0]).clamp_(0, 255)


def _color(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), m)


def _contrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), m)


def _sharpness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # torchvision's 3x3 kernel (1s around a 5, over 13) = (box sum + 4 * centre) / 13. The box sum
    # of integers is exact in float32 and an integer over 13 is never within 1/26 of a half, so
    # rounding matches the convolution exactly while avoiding a slow grouped conv on the CPU.
    out = x.float()
    inner = out[..., 1:-1, 1:-1]
    rows = out[..., :, :-2] + out[..., :, 1:-1] + out[..., :, 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    blurred = box.add_(inner, alpha=4.0).div_(13.0).round_()
    inner.add_(blurred.sub_(inner).mul_(_ratios(m)[1]))  # the border keeps its pixels, as in PIL
    return out.clamp_(0, 255)


def _posterize_mask(m: torch.Tensor) -> torch.Tensor:
    bits = m.to(torch.int64).clamp(0, 8)
    return (((1 << bits) - 1) << (8 - bits)).to(torch.uint8).view(-1, 1, 1, 1)


def _posterize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return x & _posterize_mask(m)


def _solarize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # torchvision compares uint8 pixels with 255 * m in float32; for integer pixels that is
    # x >= ceil(float32(255 * m)), which can be compared in uint8 without float promotion.
    threshold = torch.ceil((255.0 * m.double()).float()).clamp_(0, 255).to(torch.uint8).view(-1, 1, 1, 1)
    return torch.where(x >= threshold, 255 - x, x)


def _autocontrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    lo = xf.amin(dim=(-2, -1), keepdim=True)
    hi = xf.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    inv_scale = torch.where(flat, 1.0, (hi - lo).mul_(1.0 / 255.0))
    lo = torch.where(flat, 0.0, lo)
    return xf.sub_(lo).div_(inv_scale).clamp_(0, 255)


def _equalize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """torchvision's (PIL's) histogram equalisation per image and channel.

    One flat index `value + 256 * row` builds every (image, channel) histogram with one
    index_add_ and applies every LUT with one index_select (bincount and take validate
    their input and cost twice as much); the LUT maths is exact in float64.
    """
    n, c, h, w = x.shape
    rows = n * c
    offsets = torch.arange(0, rows * 256, 256, dtype=torch.int32, device=x.device).view(rows, 1)
    index = x.reshape(rows, h * w).int().add_(offsets)  # int32: half the traffic of int64
    index = index.view(-1)
    ones = torch.ones(1, dtype=torch.int64, device=x.device).expand_as(index)
    hist = torch.zeros(rows * 256, dtype=torch.int64, device=x.device).index_add_(0, index, ones).view(rows, 256)
    cum = hist.cumsum(1)
    last = cum.argmax(1, keepdim=True)  # the channel's largest value: first bin where cum peaks
    step = (h * w - hist.gather(1, last)).double().div_(255).floor_()
    lut = (cum[:, :-1].double() + (step * 0.5).floor_()).div_(step.clamp(min=1)).floor_().clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut], 1)
    # A channel with a single value (step 0) is left as it is: identity LUT.
    lut = torch.where(step == 0, torch.arange(256, device=x.device, dtype=lut.dtype), lut).to(torch.uint8)
    return lut.view(-1).index_select(0, index).view(n, c, h, w)


_OPS = {
    "Posterize": _posterize, "Solarize": _solarize, "AutoContrast": _autocontrast, "Equalize": _equalize,
    "Brightness": _brightness, "Color": _color, "Contrast": _contrast, "Sharpness": _sharpness,
}


def apply_op(x: torch.Tensor, name: str, magnitude: torch.Tensor) -> torch.Tensor:
    """Apply one AugMix op with per-sample magnitudes (n,) to uint8 images (n, 3, H, W)."""
    if name in _AFFINE:
        op = torch.full_like(magnitude, _AFFINE.index(name), dtype=torch.int64)
        h, w = x.shape[-2:]
        if name.startswith("Translate"):
            return _shift(x, *_shift_index(op, magnitude, h, w))
        return _grid_sample(x, _affine_grid(op, magnitude, h, w)).to(torch.uint8)
    return _OPS[name](x, magnitude).to(torch.uint8)


class DeviceAugment:
    """Augment uint8 (B, 3, H, W) batches on their device and return normalised float32.

    Every random draw comes from the `generator` passed per call, so a seeded
    generator per rank gives reproducible, rank-independent augmentation.
    """

    def __init__(self, config: AugmentConfig, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device | str = "cpu", image_size: tuple[int, int] = (32, 32)):
        self.config = config
        self.device = torch.device(device)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add.
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t
        self.image_size = image_size
        if config.mode == "augmix":
            self._augmix_tables()

    def _augmix_tables(self) -> None:
        config, image_size = self.config, self.image_size
        mags, signed = _magnitude_table(config.severity, *image_size)
        self._mags = mags.to(self.device)
        self._signed = signed.to(self.device)
        # Ops that are exact identities at magnitude 0 (angle/shear/shift 0, blend factor 1):
        # bin 0 selects them a third of the time at the default severity; they are skipped.
        names_at_zero = _AFFINE + ("Brightness", "Color", "Contrast", "Sharpness")
        self.op_names = tuple(_augmix_space())
        self._noop_at_zero = torch.tensor([n in names_at_zero for n in self.op_names], device=self.device)
        # Magnitudes take few values (op x level x sign), so the sampling grid of every shear and
        # rotation and the gather index of every translation are tabulated once here.
        combos = torch.arange(len(self.op_names) * config.severity * 2, device=self.device)
        op_of, rest = combos // (config.severity * 2), combos % (config.severity * 2)
        mag_of = self._mags[op_of, rest // 2] * torch.where(rest % 2 == 1, -1.0, 1.0)
        self._grids = _affine_grid(op_of, mag_of, *image_size)
        self._shift_index, self._shift_inside = _shift_index(op_of, mag_of, *image_size)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mul_(self._scale).add_(self._shift)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.config
        if cfg.mode == "none":
            return self.normalize(x)
        b = x.shape[0]
        dev = x.device
        span = 2 * cfg.pad + 1
        top = torch.randint(span, (b,), device=dev, generator=generator)
        left = torch.randint(span, (b,), device=dev, generator=generator)
        flip = (torch.rand(b, device=dev, generator=generator) < 0.5) & cfg.flip
        x = crop_flip(x, top, left, flip, cfg.pad)
        if cfg.mode == "basic":
            return self.normalize(x)
        return self.augmix(x, generator, normalize=True)

    def _dirichlet(self, k: int, b: int, generator: torch.Generator | None, dev: torch.device) -> torch.Tensor:
        # Dirichlet(alpha) as normalised Gamma(alpha) draws, from our generator (torch's sampler takes none).
        g = torch._standard_gamma(torch.full((b, k), self.config.alpha, device=dev), generator=generator)
        return g / g.sum(1, keepdim=True)

    def augmix(self, x: torch.Tensor, generator: torch.Generator | None = None,
               normalize: bool = False) -> torch.Tensor:
        """AugMix on uint8 (B, 3, H, W); returns the float32 mix in [0, 255], or normalised.

        All `width` chains of all samples run as one stacked batch of width * B.
        Each step draws an op per chain, sorts the stack by op so that each op
        runs once on a contiguous slice, and keeps that order for the next step
        (`perm` tracks it), so a step costs one gather however many ops it uses.
        """
        cfg = self.config
        if not hasattr(self, "_mags"):  # built on first use when the mode is not augmix
            self._augmix_tables()
        b, dev = x.shape[0], x.device
        n_ops, n_affine = len(self.op_names), len(_AFFINE)
        wb = cfg.width * b
        m = self._dirichlet(2, b, generator, dev)
        weights = self._dirichlet(cfg.width, b, generator, dev) * m[:, 1:2]  # (B, width)
        perm = torch.arange(wb, device=dev)  # stack row j holds chain perm[j] // B of sample perm[j] % B
        aug = x  # step 0 gathers its rows straight from the batch: no repeated copy
        if cfg.depth < 0:
            depth = torch.randint(1, 4, (wb,), device=dev, generator=generator)
        else:
            depth = torch.full((wb,), cfg.depth, device=dev)
        for step in range(3 if cfg.depth < 0 else cfg.depth):
            op = torch.randint(n_ops, (wb,), device=dev, generator=generator)
            level = torch.randint(cfg.severity, (wb,), device=dev, generator=generator)
            negate = self._signed[op] & (torch.rand(wb, device=dev, generator=generator) <= 0.5)
            mag = torch.where(negate, -self._mags[op, level], self._mags[op, level])
            combo = (op * cfg.severity + level) * 2 + negate.long()
            # Group key: shears and rotations share the grid kernel (0), translations the gather
            # kernel (2); finished chains and no-ops skip (n_ops).
            key = torch.where((op == 2) | (op == 3), 2, torch.where(op < n_affine, 0, op))
            noop = (step >= depth) | (self._noop_at_zero[op] & (mag == 0))
            key = torch.where(noop, n_ops, key)[perm]
            order = torch.argsort(key, stable=True)
            counts = torch.bincount(key, minlength=n_ops + 1).tolist()  # the one host sync per step
            perm = perm[order]
            aug = x.index_select(0, perm % b) if step == 0 else aug.index_select(0, order)
            self._apply_ops(aug, counts[:n_ops], mag[perm], combo[perm])
        aug = aug.index_select(0, torch.argsort(perm))
        # Normalisation is folded into the mixing weights: (sum w x) * scale + shift.
        scale = self._scale if normalize else torch.ones(1, 3, 1, 1, device=dev)
        mix = x.float().mul_(m[:, 0].view(b, 1, 1, 1) * scale)
        for i, chain in enumerate(aug.float().split(b)):  # converting first beats mixed-dtype addcmul_
            mix.addcmul_(chain, weights[:, i].view(b, 1, 1, 1) * scale)
        return mix.add_(self._shift) if normalize else mix

    def _apply_ops(self, aug: torch.Tensor, counts: list[int], mag: torch.Tensor, combo: torch.Tensor) -> None:
        """One AugMix step in place on the sorted stack: each op once, on its contiguous slice of rows (counts[k]
        rows of op group k; shears and rotations share group 0, translations group 2)."""
        posterize = self.op_names.index("Posterize")
        start = 0
        for k, count in enumerate(counts):
            if count:
                s = slice(start, start + count)
                if k == 0:
                    aug[s] = _grid_sample(aug[s], self._grids.index_select(0, combo[s]))
                elif k == 2:
                    c = combo[s]
                    aug[s] = _shift(aug[s], self._shift_index.index_select(0, c), self._shift_inside.index_select(0, c))
                elif k == posterize:
                    aug[s].bitwise_and_(_posterize_mask(mag[s]))  # in place: no copy
                else:
                    aug[s] = _OPS[self.op_names[k]](aug[s], mag[s])
            start += count


def reference_pipeline(config: AugmentConfig, mean: tuple[float, ...], std: tuple[float, ...]):
    """The same augmentation as torchvision v2 per-image transforms (a v2.Compose): the baseline and the tests'
    reference."""
    from torchvision.transforms import v2

    steps: list = []
    if config.mode != "none":
        steps.append(v2.RandomCrop(32, padding=config.pad, padding_mode="reflect"))
        if config.flip:
            steps.append(v2.RandomHorizontalFlip())
    if config.mode == "augmix":
        steps.append(v2.AugMix(severity=config.severity, mixture_width=config.width, chain_depth=config.depth,
                               alpha=config.alpha))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


# Peak augmentation memory per image, in uint8 images (3 KB): the float32 output (4) and, for AugMix,
# each chain's uint8 stack, gathers and float copies (6 per chain). Measured on the CPU as the peak
# RSS growth of one call on 8,192 images: none 4.0, basic 4.9, AugMix width 3 21.9.
DEFAULT_CHUNK_MIB = 1024


def chunk_batches(config: AugmentConfig, batch: int, batches_per_epoch: int,
                  budget_mib: int = DEFAULT_CHUNK_MIB) -> int:
    """Batches per bulk call that fit `budget_mib` of augmentation memory, at most an epoch."""
    images = {"none": 4, "basic": 5, "augmix": 4 + 6 * config.width}[config.mode]
    return max(1, min(batches_per_epoch, budget_mib * 2**20 // (images * 3 * 32 * 32 * batch)))


def chunk_seed(seed: int, rank: int, epoch: int, chunk: int) -> int:
    """The augmentation seed of one chunk: a pure function of where it is, so a resumed run redraws it."""
    digest = hashlib.sha256(f"augment:{seed}:{rank}:{epoch}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class BulkAugment:
    """A run's augmented training batches, made `chunk` consecutive batches of an epoch per call.

    One call to `DeviceAugment` for many batches means one round of kernel launches and AugMix's
    host syncs per chunk instead of per step. Every sample still draws its own crop, flip, chains
    and weights, so the augmentation is distributed as before. A chunk's draws come from a generator
    seeded by (seed, rank, epoch, chunk), and the last chunk of a run stops at its last step, so a run
    resumed mid-chunk recomputes that chunk and trains on exactly the batches the uninterrupted run
    trained on, whatever step it resumed at.

    `sampler` is the run's ShardedBatches; call this with the batch `sampler.next()` just returned.
    """

    def __init__(self, aug: DeviceAugment, images: torch.Tensor, sampler, *, seed: int, rank: int,
                 chunk: int, steps: int):
        self.aug, self.images, self.sampler, self.seed, self.rank = aug, images, sampler, seed, rank
        self.per_epoch = sampler.batches_per_epoch
        self.chunk = max(1, min(chunk, self.per_epoch))
        self.final = divmod(steps - 1, self.per_epoch)  # (epoch, position) of the run's last batch
        self.gen = torch.Generator(device=images.device)
        self._key: tuple[int, int] | None = None
        self._out: torch.Tensor | None = None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        epoch, position = self.sampler.last()
        c = position // self.chunk
        if self._key != (epoch, c):
            first = c * self.chunk
            stop = min(first + self.chunk, self.per_epoch)
            if epoch == self.final[0]:
                stop = min(stop, self.final[1] + 1)
            self._out = None  # free the previous chunk before the next is made
            self.gen.manual_seed(chunk_seed(self.seed, self.rank, epoch, c))
            self._out = self.aug(self.images[self.sampler.span(first, stop)], self.gen)
            self._key = (epoch, c)
        n = len(batch)
        i = (position - c * self.chunk) * n
        return self._out[i:i + n]
