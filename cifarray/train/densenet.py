"""The DenseNet classifier family: its pieces for the training engine, and its registry entry `FAMILY`.

Step: the next augmented batch (augmented on the device a chunk of batches at a time: crop, flip,
AugMix), then `update`: forward under autocast, cross-entropy, SGD (or AdamW) step; then the one-cycle
schedule step. With --cuda-graphs, `update` is captured once and replayed (cifarray.train.graphs).
Evaluation: validation accuracy; at the end, train/val/test accuracy (a sweep trial leaves test
alone) and model.pt. Report: curves, per-class accuracy, the most
confused pairs and the first 16 test images with their top-3 predictions.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cifarray import figures
from cifarray.data.augment import BulkAugment, DeviceAugment, chunk_batches
from cifarray.data.loader import DeviceSplit
from cifarray.eval.classifier import evaluate, load_finished
from cifarray.models.densenet import DenseNet, param_count
from cifarray.errors import UserError
from cifarray.rundir import RETRAIN, RunDir, load_torch, read_metrics
from cifarray.train import graphs
from cifarray.train.config import DenseNetTrainConfig
from cifarray.train.engine import Worker
from cifarray.train.graphs import GraphedStep
from cifarray.device import channels_last
from cifarray.family import Display, Family, Objective, Pieces, RunContext, SweepRules, SweepSpec


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


def build_model(cfg: DenseNetTrainConfig, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The untrained model in its training memory format (channels_last)."""
    return channels_last(DenseNet(cfg.model_config()).to(device))


@dataclass
class State:
    worker: Worker
    model: torch.nn.Module  # the raw module: evaluation, weights, checkpoints
    train_model: torch.nn.Module  # what the step runs: DDP and/or compiled
    opt: torch.optim.Optimizer
    sched: Any
    aug: DeviceAugment  # evaluation's normalisation
    batches: BulkAugment  # the augmented training batches, a chunk at a time
    val_acc: float = float("nan")  # the latest validation accuracy
    val_step: int = -1  # the step val_acc was measured at
    graphed: GraphedStep | None = None  # the captured step (--cuda-graphs), else eager
    graphs_off_because: str = ""
    lr: torch.Tensor | None = None  # the graphed step's learning rate, refilled from the schedule each step

    @property
    def stateful(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.opt, "scheduler": self.sched}

    @property
    def primary(self) -> torch.nn.Module:
        return self.model


def build(cfg: DenseNetTrainConfig, w: Worker) -> State:
    model = build_model(cfg, w.device)
    opt, sched = make_optimizer(cfg, model)
    aug = DeviceAugment(cfg.augment_config(), w.data.mean, w.data.std, device=w.device)
    per_epoch = w.sampler.batches_per_epoch
    chunk = cfg.augment_chunk or chunk_batches(aug.config, w.sampler.per_rank, per_epoch)
    batches = BulkAugment(aug, w.data.train.images, w.sampler, seed=cfg.seed, rank=w.rank, chunk=chunk,
                          steps=cfg.steps)
    state = State(w, model, w.wrap(model), opt, sched, aug, batches)
    use, state.graphs_off_because = cfg.graphs(cuda=w.device.type == "cuda", workers=w.world)
    if use:
        enable_graphs(state, capture=True)
    return state


def enable_graphs(s: State, capture: bool) -> None:
    """Train through `GraphedStep` (capture=False: its static buffers without a graph, for CPU tests)."""
    s.lr = torch.tensor(s.opt.param_groups[0]["lr"], device=s.worker.device)
    for group in s.opt.param_groups:  # what SGD's first step would create: the graph cannot branch on it
        for p in group["params"]:
            s.opt.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
    s.graphed = graphs.GraphedStep(functools.partial(update, s), capture=capture)
    # The schedule warns when opt.step() was never called before its first step; sgd_step is the step here.
    s.opt._opt_called = True


def update(s: State, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward and optimizer step on one augmented batch: what a CUDA graph captures."""
    w = s.worker
    with w.autocast(cache=s.graphed is None):
        logits = s.train_model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=w.cfg.label_smoothing)
    s.opt.zero_grad(set_to_none=True)
    loss.backward()
    if s.lr is None:
        s.opt.step()
    else:
        graphs.sgd_step(s.opt, s.lr)
    return loss.detach(), (logits.argmax(1) == y).float().mean()


def step(s: State, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    w = s.worker
    x = channels_last(s.batches(batch))
    y = w.data.train.labels[batch]
    if s.graphed is None:
        loss, acc = update(s, x, y)
    else:
        s.lr.fill_(s.opt.param_groups[0]["lr"])  # a launch with the host's value: no sync
        loss, acc = s.graphed(x, y)  # static outputs: valid until the next step (the engine sums them now)
    s.sched.step()
    return {"loss": loss, "train_acc": acc}


def evaluate_step(s: State, step: int) -> dict[str, float]:
    s.val_acc, s.val_step = evaluate(s.model, s.worker.data.val, s.aug, s.worker.device)[0], step
    return {"val_acc": s.val_acc}


def finish(s: State, run: RunDir) -> dict[str, Any]:
    w, cfg, data = s.worker, s.worker.cfg, s.worker.data
    # The engine evaluates at the last step; evaluating the same weights again would cost as much (the paper
    # model on 2 CPU cores: ~9 s for 5,000 images). A run resumed from its final checkpoint has not evaluated.
    val_acc = s.val_acc if s.val_step == cfg.steps else evaluate(s.model, data.val, s.aug, w.device)[0]
    # A sweep trial leaves the test split alone: the tuner evaluates only the best trial on it, once.
    test_acc = None
    if not w.context.sweep_trial:
        test_acc, logits = evaluate(s.model, data.test, s.aug, w.device)
        save_predictions(logits, run)
    train_eval = DeviceSplit(data.train.images[:len(data.test)], data.train.labels[:len(data.test)])
    train_acc, _ = evaluate(s.model, train_eval, s.aug, w.device)
    torch.save(s.model.state_dict(), run.path / "model.pt")
    return {"params": param_count(cfg.model_config()), "train_acc": train_acc, "val_acc": val_acc,
            "test_acc": test_acc, "train_acc_note": f"unaugmented, on the first {len(train_eval)} training images",
            **graphs.describe(s.graphed, s.graphs_off_because),
            "augment_chunk": s.batches.chunk,
            "config": cfg.model_config().__dict__ | {"blocks": list(cfg.blocks)}}


PREDICTIONS = "test_predictions.pt"
FIGURE_IMAGES = 16  # inference.png shows the first 16 test images


def predictions(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the report needs of the test logits: every prediction, and the first images' top 3."""
    top3 = logits[:FIGURE_IMAGES].float().softmax(1).topk(3, dim=1)
    return {"pred": logits.argmax(1).cpu(), "top3_values": top3.values.cpu(), "top3_indices": top3.indices.cpu()}


def save_predictions(logits: torch.Tensor, run: RunDir) -> None:
    # Written with model.pt by the worker, so that the report does not evaluate the model again on the
    # driver's CPU (about a minute for 10,000 test images with the paper model on 2 cores).
    torch.save(predictions(logits), run.path / PREDICTIONS)


def test_accuracy(run: RunDir, cfg: DenseNetTrainConfig, context: RunContext | None = None) -> dict[str, Any]:
    """The one use of the test split in a sweep: the best trial's final weights, evaluated once, on the CPU."""
    model, data, aug = load_finished(run, cfg, build_model)
    return {"test_acc": evaluate(model, data.test, aug, torch.device("cpu"))[0]}


class BlockLayout(SweepRules):
    """`num_blocks` and `layers_per_block` (one draw per block: layers_0, layers_1, ...) -> `blocks`."""

    keys = ("num_blocks", "layers_per_block")

    def validate(self, space, source):
        from cifarray.errors import UserError

        if ("num_blocks" in space) != ("layers_per_block" in space):
            raise UserError(f"{source}: [space] num_blocks and layers_per_block go together (the block layout)")
        if "num_blocks" in space and "blocks" in space:
            raise UserError(f"{source}: [space] blocks and num_blocks/layers_per_block exclude each other")
        super().validate(space, source)

    def sample(self, space, trial):
        sampled = {name: p.suggest(trial) for name, p in space.items() if name != "layers_per_block"}
        if "num_blocks" in sampled:
            for i in range(int(sampled["num_blocks"])):
                sampled[f"layers_{i}"] = space["layers_per_block"].suggest(trial, f"layers_{i}")
        return sampled

    def corner(self, sampled):
        if "num_blocks" in sampled:
            sampled = {**sampled, **{f"layers_{b}": sampled["layers_per_block"]
                                     for b in range(int(sampled["num_blocks"]))}}
        return sampled

    def fixed(self, values):
        return {k: v for k, v in self.corner(values).items() if k != "layers_per_block"}

    def expand(self, sampled):
        if "num_blocks" not in sampled:
            return {}
        return {"blocks": tuple(int(sampled[f"layers_{i}"]) for i in range(int(sampled["num_blocks"])))}

    def columns(self, space_keys):
        return (("batch", lambda c: c.get("batch_size")), ("lr", lambda c: c.get("lr")),
                ("k", lambda c: c.get("growth_rate")), ("layout", layout))


def layout(config: dict[str, Any]) -> str:
    """A trial's block layout as 5-5-5-5 (sampled per block) or 5,5,5,5 (fixed)."""
    if "num_blocks" in config:
        return "-".join(str(config[f"layers_{i}"]) for i in range(int(config["num_blocks"])))
    return ",".join(map(str, config.get("blocks", ())))


def report(run: RunDir, cfg: DenseNetTrainConfig) -> list[Path]:
    """curves.png, per_class_accuracy.csv, confused_pairs.csv, inference.png (python -m cifarray.report)."""
    weights = run.path / "model.pt"
    if not weights.is_file():
        raise UserError(f"{run.path}: no model.pt; the run has not finished (rerun its training command)")
    tag = " (procedural data)" if cfg.synthetic else ""
    out = [figures.curves(run, read_metrics(run.metrics),
                          [("loss", ["loss"]), ("accuracy", ["train_acc", "val_acc"])],
                          f"DenseNet k={cfg.growth_rate} blocks={','.join(map(str, cfg.blocks))}{tag}")]
    model, data, aug = load_finished(run, cfg, build_model)
    saved = run.path / PREDICTIONS
    saved = load_torch(saved, "the test predictions", RETRAIN) if saved.is_file() else None
    if saved is None or len(saved["pred"]) != len(data.test):  # a sweep trial's run never saw the test split
        saved = predictions(evaluate(model, data.test, aug, torch.device("cpu"))[1])
    pred, labels, names = saved["pred"], data.test.labels, data.class_names
    top3 = zip(saved["top3_values"].tolist(), saved["top3_indices"].tolist())
    n = len(names)
    confusion = torch.zeros(n, n, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    with open(run.path / "per_class_accuracy.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class", "name", "test_images", "accuracy"])
        for c in range(n):
            total = int(confusion[c].sum())
            w.writerow([c, names[c], total, f"{confusion[c, c].item() / total:.4f}" if total else ""])
    pairs = (confusion + confusion.T).triu(1)  # unordered pairs: a taken for b plus b taken for a
    top = torch.topk(pairs.flatten(), k=min(10, n * (n - 1) // 2))
    with open(run.path / "confused_pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class_a", "class_b", "a_as_b", "b_as_a", "total"])
        for value, flat in zip(top.values.tolist(), top.indices.tolist()):
            a, b = divmod(flat, n)
            w.writerow([names[a], names[b], int(confusion[a, b]), int(confusion[b, a]), value])
    out += [run.path / "per_class_accuracy.csv", run.path / "confused_pairs.csv"]
    fig = inference_figure(data.test.images, labels, pred, top3, names, tag)
    fig.savefig(run.path / "inference.png")
    figures.pyplot().close(fig)
    return out + [run.path / "inference.png"]


def inference_figure(images: torch.Tensor, labels: torch.Tensor, pred: torch.Tensor, top3, names: list[str],
                     tag: str):
    """The first 16 test images with their top-3 classes and confidences, and the true class where wrong."""
    plt = figures.pyplot()
    fig, axes = plt.subplots(4, 4, figsize=(10, 11), dpi=100)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, (values, classes)) in enumerate(zip(axes.flat, top3)):
        ax.imshow(images[i].permute(1, 2, 0).numpy())
        lines = [f"{names[c][:18]} {p:.0%}" for p, c in zip(values, classes)]
        ok = "ok" if pred[i] == labels[i] else f"true: {names[int(labels[i])][:16]}"
        ax.set_title("\n".join(lines + [ok]), fontsize=7)
    fig.suptitle(f"first 16 test images, top-3 predictions{tag}")
    # Room above each image for its four title lines: tight_layout left them running into the image above.
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.01, top=0.9, wspace=0.1, hspace=0.55)
    return fig


def _log_fields(s: State) -> dict[str, Any]:
    # val_acc is not repeated here: a row holds it only where validation ran, so curves (and ASHA's replay of
    # a resumed sweep) see the steps it was measured at, not a staircase of copies.
    return {"lr": s.sched.get_last_lr()[0]}


def _objective(ctx) -> Objective:
    return Objective("val_acc", "max", "validation accuracy")


FAMILY = Family(
    name="densenet", config=DenseNetTrainConfig,
    pieces=Pieces(build=build, step=step, evaluate=evaluate_step, finish=finish, log_fields=_log_fields,
                  metric_fields=("loss", "train_acc", "val_acc", "lr")),
    sweep=SweepSpec(objective=_objective, rules=BlockLayout(), test_metrics=test_accuracy),
    display=Display(figures=report, description="the DenseNet classifier (CIFAR-100, <= 100k params)",
                    progress_keys=("loss", "train_acc", "val_acc", "images_per_s"),
                    summary_keys=("params", "steps", "seconds", "images_per_s", "val_acc", "test_acc")),
)
