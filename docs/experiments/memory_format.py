"""One training step in contiguous NCHW against channels_last, on this machine's CPU.

    python docs/experiments/memory_format.py            # 1 and 2 threads, fp32 and (where native) bf16

Times forward + backward + optimizer step of the models the trainers build (the tests' tiny DenseNet,
the quickstart sweep's best trial, the paper DenseNet, the paper DCGAN's D + G step) on random data, the two
layouts interleaved three times, and prints the best of the three for each with the ratio. Results:
docs/BENCHMARKS.md, "Memory format".
"""

import platform
import sys
import time

import torch
import torch.nn.functional as F

from cifarray.models.dcgan import DCGANConfig, Discriminator, Generator
from cifarray.models.densenet import DenseNet, DenseNetConfig, param_count
from cifarray.device import autocast, resolve_precision

DENSENETS = {
    "densenet k=4 2,2,2 (tests)": (DenseNetConfig(growth_rate=4, blocks=(2, 2, 2), init_channels=16), 128),
    "densenet k=7 2,2,2 (quickstart best)": (DenseNetConfig(growth_rate=7, blocks=(2, 2, 2), init_channels=16), 64),
    "densenet paper": (DenseNetConfig(), 128),
}


def densenet_step(cfg, batch, layout, precision):
    model = DenseNet(cfg).to(memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=layout)
    y = torch.randint(0, 100, (batch,))

    def step():
        with autocast(torch.device("cpu"), precision):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def dcgan_step(batch, layout, precision):
    cfg = DCGANConfig()
    g, d = Generator(cfg).to(memory_format=layout), Discriminator(cfg).to(memory_format=layout)
    opt_g = torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), 2e-4, betas=(0.5, 0.999))
    real = torch.rand(batch, 3, 32, 32).contiguous(memory_format=layout)
    ones, zeros = torch.full((batch,), 0.9), torch.zeros(batch)

    def step():
        with autocast(torch.device("cpu"), precision):
            fake = g(torch.randn(batch, cfg.z_dim))
            loss_d = F.binary_cross_entropy_with_logits(d(real).float().flatten(), ones) + \
                F.binary_cross_entropy_with_logits(d(fake.detach()).float().flatten(), zeros)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        with autocast(torch.device("cpu"), precision):
            loss_g = F.binary_cross_entropy_with_logits(d(fake).float().flatten(), torch.ones(batch))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    return step


def best_ms(make, reps=3, warmup=2, n=8):
    out = {}
    for _ in range(reps):
        for layout in (torch.contiguous_format, torch.channels_last):
            torch.manual_seed(0)
            step = make(layout)
            for _ in range(warmup):
                step()
            t = time.perf_counter()
            for _ in range(n):
                step()
            ms = (time.perf_counter() - t) / n * 1000
            out[layout] = min(out.get(layout, ms), ms)
    return out[torch.contiguous_format], out[torch.channels_last]


def main() -> None:
    precisions = sorted({"fp32", resolve_precision("auto", torch.device("cpu"))})
    print(f"cpu: {platform.processor() or platform.machine()} ({_cpu_model()}), torch {torch.__version__}, "
          f"precisions: {', '.join(precisions)}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for precision in precisions:
            for name, (cfg, batch) in DENSENETS.items():
                if name == "densenet paper" and threads == 1:
                    continue  # ~1.5 s a step: the 2-thread figure says the same
                a, b = best_ms(lambda layout: densenet_step(cfg, batch, layout, precision))
                print(f"{threads} thread(s) {precision} {name} ({param_count(cfg):,} params, batch {batch}): "
                      f"NCHW {a:.0f} ms, channels_last {b:.0f} ms, {a / b:.2f}x", flush=True)
            a, b = best_ms(lambda layout: dcgan_step(128, layout, precision))
            print(f"{threads} thread(s) {precision} dcgan paper D+G (batch 128): NCHW {a:.0f} ms, "
                  f"channels_last {b:.0f} ms, {a / b:.2f}x", flush=True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
