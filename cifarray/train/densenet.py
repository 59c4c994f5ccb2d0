"""DenseNet training, one function per Ray Train worker (1 CPU process or N GPU ranks alike)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from cifarray.config import from_dict
from cifarray.data.augment import AugmentConfig, DeviceAugment
from cifarray.data.loader import DeviceSplit, ShardedBatches, prepare
from cifarray.models.densenet import DenseNet, param_count
from cifarray.train import common
from cifarray.train.config import DenseNetTrainConfig

METRIC_FIELDS = ["step", "loss", "train_acc", "val_acc", "lr", "images_per_s", "seconds", "attempt"]


def make_optimizer(cfg: DenseNetTrainConfig, model: torch.nn.Module):
    # No weight decay on BN parameters and biases: decaying BN scales only fights the normalisation.
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    # One-cycle: linear warm-up then cosine decay, over exactly cfg.steps steps.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps,
                                                pct_start=max(cfg.warmup, 1e-3), anneal_strategy="cos",
                                                div_factor=25.0, final_div_factor=1e3, cycle_momentum=False)
    return opt, sched


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
        x = augment.normalize(split.images[start:start + batch])
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        outs.append(model(x).float())
    model.train(was_training)
    logits = torch.cat(outs) if outs else torch.zeros(0, 100, device=device)
    acc = (logits.argmax(1) == split.labels).float().mean().item() if len(split) else float("nan")
    return acc, logits


def train_densenet(config: dict) -> None:
    import ray.train.torch

    cfg = from_dict(DenseNetTrainConfig, config)
    run = common.RunDir(cfg.out)
    device, rank, world = common.setup_worker(cfg)
    precision = common.resolve_precision(cfg.precision, device)
    attempt = common.next_attempt(run) if rank == 0 else 0
    data = prepare(common.load_data(cfg), val_size=cfg.val_size, seed=cfg.seed, device=device)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = DenseNet(cfg.model_config()).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt, sched = make_optimizer(cfg, model)
    sampler = ShardedBatches(len(data.train), cfg.batch_size, rank=rank, world=world, seed=cfg.seed)
    aug = DeviceAugment(cfg.augment_config(), data.mean, data.std, device=device)
    gen = torch.Generator(device=device)

    stateful = {"model": model, "optimizer": opt, "scheduler": sched, "sampler": sampler}
    start = common.restore(stateful)
    gen.manual_seed(common.augment_seed(cfg.seed, rank, start))

    raw_model = model
    model = ray.train.torch.prepare_model(model, move_to_device=False)  # DDP when world > 1
    if cfg.compile:
        model = torch.compile(model)
    log = common.MetricsLog(run.metrics, METRIC_FIELDS)
    if rank == 0:
        log.truncate_after(start)
    common.write_worker_info(run, rank, pid=__import__("os").getpid(), host=__import__("socket").gethostname(),
                             start_step=start, attempt=attempt)

    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    window_start, window_steps = time.perf_counter(), 0
    val_acc = float("nan")
    model.train()
    for step in range(start + 1, cfg.steps + 1):
        idx = sampler.next().to(device)
        x = aug(data.train.images[idx], gen)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        y = data.train.labels[idx]
        with common.autocast(device, precision):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.detach()
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        window_steps += 1

        is_last = step == cfg.steps
        log_now = step % cfg.log_every == 0 or is_last
        ckpt_now = step % cfg.checkpoint_every == 0 or is_last
        if not (log_now or ckpt_now):
            continue
        # One collective: sums of loss and accuracy over ranks, and whether any rank diverged.
        loss_total, correct_total, seen_total = common.all_reduce_sum(
            [loss_sum.item(), correct.item(), float(seen)], device)
        elapsed = time.perf_counter() - window_start
        mean_loss = loss_total / max(1, window_steps * world)
        if not math.isfinite(mean_loss):
            common.stop_diverged(run, step, mean_loss, rank)
            return
        if step % cfg.eval_every == 0 or is_last:
            val_acc = evaluate(raw_model, data.val, aug, device)[0] if rank == 0 else float("nan")
        row = {"step": step, "loss": mean_loss, "train_acc": correct_total / max(1.0, seen_total),
               "val_acc": val_acc, "lr": sched.get_last_lr()[0],
               "images_per_s": window_steps * cfg.batch_size / max(elapsed, 1e-9),
               "seconds": elapsed, "attempt": attempt}
        if rank == 0:
            log.append(row)
        state = None
        if ckpt_now:
            state = common.snapshot(stateful, step)
            gen.manual_seed(common.augment_seed(cfg.seed, rank, step))
        if is_last:
            break  # the final report comes after the final files (below)
        if ckpt_now or step % cfg.eval_every == 0:  # a report is a round trip to the controller
            common.report(run, row, state, rank)
        loss_sum.zero_()
        correct.zero_()
        seen, window_steps, window_start = 0, 0, time.perf_counter()

    common.write_worker_info(run, rank, params_sha256=common.params_sha256(raw_model), final_step=cfg.steps)
    if rank == 0:
        # A sweep trial leaves the test split alone: the tuner evaluates only the best trial on it, once.
        _finish(cfg, run, raw_model, data, aug, device, world, precision,
                evaluate_test=not config.get("_sweep_trial"))
    if start < cfg.steps:
        # Last, so that whoever acts on the final result (Tune's scheduler may end the trial on it) finds
        # the weights and summary.json already written.
        common.report(run, row, state, rank)


def load_finished(run: common.RunDir, cfg: DenseNetTrainConfig):
    """A finished run's final weights, data splits and normalisation, on the CPU: (model, data, augment)."""
    data = prepare(common.load_data(cfg), val_size=cfg.val_size, seed=cfg.seed)
    model = DenseNet(cfg.model_config())
    model.load_state_dict(torch.load(run.path / "model.pt", map_location="cpu", weights_only=True))
    return model, data, DeviceAugment(AugmentConfig(mode="none"), data.mean, data.std)


def _finish(cfg, run, model, data, aug, device, world, precision, evaluate_test: bool = True) -> None:
    rows = common.read_metrics(run.metrics)
    total_seconds = sum(float(r["seconds"]) for r in rows)
    val_acc, _ = evaluate(model, data.val, aug, device)
    test_acc = evaluate(model, data.test, aug, device)[0] if evaluate_test else None  # the only use of test
    train_eval = DeviceSplit(data.train.images[:len(data.test)], data.train.labels[:len(data.test)])
    train_acc, _ = evaluate(model, train_eval, aug, device)
    torch.save(model.state_dict(), run.path / "model.pt")
    run.write_json("summary.json", {
        "model": "densenet", "status": "complete", "params": param_count(cfg.model_config()),
        "steps": cfg.steps, "workers": world, "batch_size": cfg.batch_size, "seconds": round(total_seconds, 2),
        "images_per_s": round(cfg.steps * cfg.batch_size / max(total_seconds, 1e-9), 1),
        "train_acc": train_acc, "val_acc": val_acc, "test_acc": test_acc,
        "train_acc_note": f"unaugmented, on the first {len(train_eval)} training images",
        "seed": cfg.seed, "precision": precision,
        "config": cfg.model_config().__dict__ | {"blocks": list(cfg.blocks)},
        **common.provenance(device),
    })
