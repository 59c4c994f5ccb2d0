"""Classifier evaluation and loading a finished classifier run: shared by the trainer, the report,
the tuner's one test evaluation and the bench."""

from __future__ import annotations

import torch

from cifarray.data.augment import AugmentConfig, DeviceAugment
from cifarray.data.loader import DeviceSplit
from cifarray.rundir import RETRAIN, RunDir, load_state_into
from cifarray.device import channels_last


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: DeviceSplit, augment: DeviceAugment, device: torch.device,
             batch: int = 1000) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy on a whole split; returns (accuracy, logits).

    Always in fp32, whatever the training precision: accuracies then do not depend on it, and the
    tuner's and the report's CPU re-evaluations of a finished run give the same numbers.
    """
    was_training = model.training
    model.eval()
    outs = []
    for start in range(0, len(split), batch):
        x = channels_last(augment.normalize(split.images[start:start + batch]))  # the trainers' layout
        outs.append(model(x).float())
    model.train(was_training)
    logits = torch.cat(outs) if outs else torch.zeros(0, 100, device=device)
    acc = (logits.argmax(1) == split.labels).float().mean().item() if len(split) else float("nan")
    return acc, logits


def load_finished(run: RunDir, cfg, build_model) -> tuple[torch.nn.Module, object, DeviceAugment]:
    """A finished run's final weights (model.pt), data splits and normalisation, on the CPU.

    `build_model(cfg)` makes the untrained module of the run's family."""
    data = cfg.data_source().prepare()
    model = build_model(cfg)
    load_state_into(model, run.path / "model.pt", "the model's weights", RETRAIN)
    return model, data, DeviceAugment(AugmentConfig(mode="none"), data.mean, data.std)
