"""How a run's tensors sit on its device: the precision it computes in and the memory format it trains in.

Shared by the trainers, the evaluation of a finished run and the benches, so that all of them compute alike.
"""

from __future__ import annotations

import torch


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision auto: bf16 where the hardware computes it natively, else fp32.

    On this project's 2-core Xeon (AMX) bf16 autocast trains DenseNet 1.4-1.5x faster than fp32,
    with AVX512-BF16 alone (oneDNN capped below AMX) 1.17x; a CPU without either emulates bf16
    and ran 0.84x of fp32, so it keeps fp32 (docs/BENCHMARKS.md).
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    native = [getattr(torch.cpu, name, lambda: False) for name in ("_is_amx_tile_supported",
                                                                  "_is_avx512_bf16_supported")]
    return "bf16" if any(f() for f in native) else "fp32"


def channels_last(x):
    """A module or a 4-d batch in the layout every family trains in, on every device.

    CUDA's tensor cores want it; on CPU, oneDNN's convolutions and batch norm ran DenseNet and DCGAN
    steps 1.2-1.4x faster in it than in contiguous NCHW (fp32, 2-core AMD EPYC; level within noise on
    the AMX Xeon in bf16): docs/BENCHMARKS.md "Memory format".
    """
    if isinstance(x, torch.nn.Module):
        return x.to(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last)


def autocast(device: torch.device, precision: str, cache: bool = True):
    """Mixed precision for a resolved --precision: weights, optimizer state and losses stay fp32.

    `cache=False` inside a captured CUDA graph (PyTorch's graph notes: the cast cache must not outlive capture).
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=cache)
