"""Basic augmentation against none on a small `hard` training set, trained long enough to memorise.

    python docs/experiments/augment_vs_none.py basic 20 2400 64 0   # MODE PER_CLASS STEPS BATCH SEED
    python docs/experiments/augment_vs_none.py none 20 2400 64 0

Prints one JSON line per eighth of the run: test accuracy and unaugmented training accuracy. The model
is the learning tests' small CNN (tests/test_synth_learnable.py); `basic` batches go through the
project's DeviceAugment. Results: docs/BENCHMARKS.md, "Basic augmentation against none".
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from test_synth_learnable import MEAN, STD, small_cnn, to_input  # noqa: E402

from cifarray.data.augment import AugmentConfig, DeviceAugment  # noqa: E402
from cifarray.data.cifar import load_cifar100  # noqa: E402
from cifarray.data.synth import write_synthetic  # noqa: E402


def main(mode: str, per_class: int, steps: int, batch: int, seed: int = 0) -> None:
    torch.set_num_threads(1)  # two settings side by side on 2 cores
    root = Path(f"/tmp/augment-vs-none/data{per_class}")
    write_synthetic(root, train_per_class=per_class, test_per_class=20, seed=2, difficulty="hard")
    data = load_cifar100(root, verify=False)
    torch.manual_seed(seed)
    model = small_cnn((32, 64, 96))  # the widths its recorded results used
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    images = torch.from_numpy(np.ascontiguousarray(data.train.images))
    labels = torch.from_numpy(data.train.fine_labels)
    aug = DeviceAugment(AugmentConfig(mode=mode), MEAN, STD) if mode != "none" else None
    g = torch.Generator().manual_seed(seed)

    def accuracy(split) -> float:
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(to_input(np.ascontiguousarray(split.images[i:i + 500]))).argmax(1)
                              for i in range(0, len(split.images), 500)]).numpy()
        model.train()
        return float((pred == split.fine_labels).mean())

    start = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(len(labels), (batch,), generator=g)
        xb = aug(images[idx], g) if aug else to_input(images[idx].numpy())
        loss = nn.functional.cross_entropy(model(xb), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % (steps // 8) == 0:
            print(json.dumps({"mode": mode, "seed": seed, "step": step, "test": accuracy(data.test),
                              "train": accuracy(data.train), "s": round(time.time() - start)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
