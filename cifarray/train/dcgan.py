"""The DCGAN family: its pieces for the training engine, and its registry entry `FAMILY`.

The paper's objective: sigmoid + BCE (as BCEWithLogits) with one-sided label
smoothing (real targets 1 - s) and optional noisy real labels; Adam with beta1 =
0.5. A hinge loss is available for sweeps. A grid of samples from a fixed latent
batch is saved at step 0 and at every evaluation (samples/step_XXXXXXX.png).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cifarray import figures
from cifarray.errors import UserError
from cifarray.metrics import stats_fd
from cifarray.models.dcgan import Discriminator, Generator, discriminator_params, generator_params
from cifarray.rundir import RETRAIN, RunDir, load_state_into, measured, read_metrics
from cifarray.train.config import DCGANTrainConfig
from cifarray.train.engine import Worker
from cifarray.train.graphs import GraphedStep, describe
from cifarray.device import channels_last
from cifarray.family import Display, Family, Objective, Pieces, RunContext, SweepRules, SweepSpec

GRID = 64  # 8 x 8 samples
STATS_SAMPLES = 1000  # generated and real images per stats_fd (~0.1 s on a CPU)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return (x.float() + 1) / 2  # generator output in [-1, 1] -> [0, 1]


def save_image(images: torch.Tensor, path, **kwargs) -> None:
    # torchvision is imported here, not with the module: its import loads torch._dynamo (~2.5 s), which
    # every process that imports the registry but builds no optimizer (the CLI drivers, the tuner, each
    # trial's driver) would otherwise pay.
    from torchvision.utils import save_image as save

    save(images, path, **kwargs)


def save_grid(g: torch.nn.Module, z: torch.Tensor, path: str) -> None:
    was = g.training
    g.eval()
    with torch.no_grad():
        save_image(to_unit(g(z)).clamp(0, 1), path, nrow=8, padding=2)
    g.train(was)


def fid_weights_for_training(cfg: DCGANTrainConfig) -> RunContext:
    """Driver side: the safe weights path and sha256 for FID during training, or none (with a notice).

    Resolved once here, so workers neither re-hash the file at every evaluation nor cache the
    reference statistics a second time under the safe copy's hash."""
    from cifarray.errors import UserError
    from cifarray.eval import fid

    if cfg.fid_every == -1:
        return RunContext()
    try:
        path, sha = fid.resolve_weights(cfg.inception_weights)
    except UserError as exc:
        if cfg.inception_weights:
            raise  # asked for explicitly: a wrong path is an error
        print(f"FID during training: off ({exc})", flush=True)
        return RunContext()
    return RunContext(fid_weights=(str(path), str(sha)))


@dataclass
class State:
    worker: Worker
    g: torch.nn.Module
    d: torch.nn.Module
    g_train: torch.nn.Module  # DDP and/or compiled
    d_train: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: torch.nn.Module | None
    fixed_z: torch.Tensor
    real_target: torch.Tensor
    fake_target: torch.Tensor
    reference: Any  # the split stats_fd and FID compare with: val in a sweep (selection), else test
    reference_name: str
    fid_every: int
    best: dict | None  # the best FID so far (best_fid.json survives restarts)
    graphs_off_because: str = ""
    graphed: GraphedStep | None = None  # the captured D+G step (--cuda-graphs), else eager

    @property
    def stateful(self) -> dict[str, Any]:
        return {"g": self.g, "d": self.d, "opt_g": self.opt_g, "opt_d": self.opt_d,
                **({"ema": self.ema} if self.ema is not None else {})}

    @property
    def primary(self) -> torch.nn.Module:
        return self.g

    @property
    def sampler_g(self) -> torch.nn.Module:
        return self.ema or self.g


def build(cfg: DCGANTrainConfig, w: Worker) -> State:
    mc = cfg.model_config()
    g, d = channels_last(Generator(mc).to(w.device)), channels_last(Discriminator(mc).to(w.device))
    use_graphs, off_because = cfg.graphs(cuda=w.device.type == "cuda", workers=w.world)
    # capturable: Adam keeps its step counts on the device, so a captured graph can advance them.
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, 0.999), capturable=use_graphs)
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, 0.999), capturable=use_graphs)
    ema = copy.deepcopy(g).requires_grad_(False) if cfg.ema else None
    fixed_z = torch.randn(GRID, cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(w.device)
    per_rank = cfg.batch_size // w.world
    # A sweep selects on validation images; the test split stays unseen until the paper-style FID afterwards.
    sweep = w.context.sweep_trial
    fid_every = 0 if w.context.fid_weights is None else (cfg.eval_every if sweep else cfg.fid_every or cfg.eval_every)
    state = State(w, g, d, w.wrap(g), w.wrap(d), opt_g, opt_d, ema, fixed_z,
                  real_target=torch.full((per_rank,), 1.0 - cfg.label_smoothing, device=w.device),
                  fake_target=torch.zeros(per_rank, device=w.device),
                  reference=w.data.val if sweep else w.data.test, reference_name="val" if sweep else "test",
                  fid_every=fid_every, best=w.run.read_json("best_fid.json"), graphs_off_because=off_because)
    if use_graphs:
        enable_graphs(state, capture=True)
    return state


def begin(s: State) -> None:
    samples = s.worker.run.path / "samples"
    samples.mkdir(exist_ok=True)
    if s.worker.start == 0:
        save_grid(s.sampler_g, s.fixed_z, str(samples / "step_0000000.png"))  # the untrained baseline


def inputs(s: State, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real images (scaled to [-1, 1], flipped), latents and real targets: every random draw of a step, made
    outside `update` so that a captured graph replays none of them."""
    w, cfg = s.worker, s.worker.cfg
    n = len(batch)
    real = channels_last(w.data.train.images[batch].float().div_(127.5).sub_(1.0))
    if cfg.flip:
        flip = torch.rand(n, device=w.device, generator=w.gen) < 0.5
        real = torch.where(flip.view(-1, 1, 1, 1), real.flip(-1), real)
    z = torch.randn(n, cfg.z_dim, device=w.device, generator=w.gen)
    target = s.real_target
    if cfg.loss == "bce" and cfg.label_noise:
        target = (target + cfg.label_noise * torch.randn(n, device=w.device, generator=w.gen)).clamp(0, 1)
    return real, z, target


def update(s: State, real: torch.Tensor, z: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One D step and one G step (and the EMA): what a CUDA graph captures."""
    w, cfg = s.worker, s.worker.cfg
    with w.autocast(cache=s.graphed is None):
        fake = s.g_train(z)
        d_real, d_fake = s.d_train(real).float(), s.d_train(fake.detach()).float()
        if cfg.loss == "bce":
            loss_d = F.binary_cross_entropy_with_logits(d_real, target) + \
                F.binary_cross_entropy_with_logits(d_fake, s.fake_target)
        else:
            loss_d = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    s.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    s.opt_d.step()
    with w.autocast(cache=s.graphed is None):
        d_gen = s.d_train(fake).float()
        loss_g = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen)) if cfg.loss == "bce" \
            else -d_gen.mean()
    s.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()  # also leaves gradients in D; opt_d.zero_grad clears them next step
    s.opt_g.step()
    if s.ema is not None:
        with torch.no_grad():
            torch._foreach_lerp_(list(s.ema.parameters()), list(s.g.parameters()), 1 - cfg.ema)
            torch._foreach_copy_(list(s.ema.buffers()), list(s.g.buffers()))
    return (loss_d.detach(), loss_g.detach(), torch.sigmoid(d_real).mean().detach(),
            torch.sigmoid(d_fake).mean().detach())


METRICS = ("loss_d", "loss_g", "d_real", "d_fake")


def step(s: State, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    x = inputs(s, batch)
    # Graphed outputs are static: valid until the next step (the engine sums them at once).
    return dict(zip(METRICS, s.graphed(*x) if s.graphed is not None else update(s, *x)))


def enable_graphs(s: State, capture: bool) -> None:
    """Train through `GraphedStep` (capture=False: its static buffers without a graph, for CPU tests)."""
    s.graphed = GraphedStep(functools.partial(update, s), capture=capture)


def evaluates_at(s: State, step: int) -> bool:
    return step % s.worker.cfg.eval_every == 0 or bool(s.fid_every and step % s.fid_every == 0)


def evaluate(s: State, step: int) -> dict[str, float]:
    from cifarray.eval import fid as fid_lib

    w, cfg = s.worker, s.worker.cfg
    is_last = step == cfg.steps
    row: dict[str, float] = {}
    if step % cfg.eval_every == 0 or is_last:
        # Offline sanity signal (not FID): distance of low-order image statistics to real images.
        n = min(STATS_SAMPLES, len(s.reference))
        row["stats_fd"] = stats_fd(fid_lib.sample_generator(s.sampler_g, n, cfg.z_dim, seed=cfg.seed).float() / 255,
                                   s.reference.images[:n].float().cpu() / 255)
    if s.fid_every and (step % s.fid_every == 0 or is_last):
        samples = fid_lib.sample_generator(s.sampler_g, cfg.fid_samples, cfg.z_dim, seed=cfg.seed)
        weights = fid_lib.InceptionWeights(Path(w.context.fid_weights[0]), w.context.fid_weights[1])
        row["fid"] = fid_lib.compute(samples, s.reference.images.cpu().numpy(), split=s.reference_name,
                                     weights=weights)["fid"]
        if s.best is None or row["fid"] < s.best["fid"]:
            s.best = {"step": step, "fid": row["fid"], "samples": cfg.fid_samples, "reference": s.reference_name}
            torch.save(s.sampler_g.state_dict(), w.run.path / "generator_best.pt")
            w.run.write_json("best_fid.json", s.best)
    if step % cfg.eval_every == 0 or is_last:
        save_grid(s.sampler_g, s.fixed_z, str(w.run.path / "samples" / f"step_{step:07d}.png"))
    return row


def finish(s: State, run: RunDir) -> dict[str, Any]:
    cfg = s.worker.cfg
    torch.save(s.sampler_g.state_dict(), run.path / "generator.pt")
    torch.save(s.d.state_dict(), run.path / "discriminator.pt")
    rows = read_metrics(run.metrics)
    mc = cfg.model_config()
    gp, dp = generator_params(mc), discriminator_params(mc)
    return {
        "params_g": gp, "params_d": dp, "params": gp + dp, "loss": cfg.loss, "ema": cfg.ema,
        "samples": str(run.path / "samples"),
        "best_fid": s.best and s.best["fid"], "best_fid_step": s.best and s.best["step"],
        "fid_during_training": (f"every {s.fid_every} steps, {cfg.fid_samples} samples vs the {s.reference_name} split"
                                + (" (procedural data)" if cfg.synthetic else "")) if s.fid_every
        else "off (no Inception weights)",
        "final": {k: float(rows[-1][k]) for k in METRICS} if rows else {},
        **describe(s.graphed, s.graphs_off_because),
    }


def objective(ctx: RunContext) -> Objective:
    if ctx.fid_weights:
        return Objective("fid", "min", "FID vs the validation split")
    # Without Inception weights there is no FID. The fallback is a Fréchet distance of low-order image
    # statistics (colour, contrast, edges) between samples and validation images: it falls as samples
    # stop looking like noise (the trainer tests rely on that), and it is labelled as what it is.
    return Objective("stats_fd", "min", "stats_fd (fallback: no Inception weights, NOT FID)")


class Widths(SweepRules):
    """`g_width`/`d_width`: the narrowest generator/discriminator width, doubled per layer."""

    keys = ("g_width", "d_width")

    def expand(self, sampled):
        out = {}
        if "g_width" in sampled:
            w = int(sampled["g_width"])
            out["g_widths"] = (8 * w, 4 * w, 2 * w, w)
        if "d_width" in sampled:
            w = int(sampled["d_width"])
            out["d_widths"] = (w, 2 * w, 4 * w, 8 * w)
        return out

    def columns(self, space_keys):
        def widths(c):
            return f"{c.get('g_width', '')}/{c.get('d_width', '')}" if "g_width" in c or "d_width" in c else ""

        return (("batch", lambda c: c.get("batch_size")), ("lr_g", lambda c: c.get("lr_g")),
                ("lr_d", lambda c: c.get("lr_d")), ("widths", widths))


def report(run: RunDir, cfg: DCGANTrainConfig) -> list[Path]:
    """curves.png, samples.png, interpolation.png (python -m cifarray.report)."""
    weights = run.path / "generator.pt"
    if not weights.is_file():
        raise UserError(f"{run.path}: no generator.pt; the run has not finished (rerun its training command)")
    rows = read_metrics(run.metrics)
    panels = [("loss", ["loss_d", "loss_g"]), ("D output", ["d_real", "d_fake"])]
    if any(measured(r, "fid") for r in rows):
        panels.append(("FID", ["fid"]))
    out = [figures.curves(run, rows, panels, "DCGAN" + (" (procedural data)" if cfg.synthetic else ""))]
    g = Generator(cfg.model_config())
    load_state_into(g, weights, "the generator's weights", RETRAIN)
    g.eval()
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = torch.randn(64, cfg.z_dim, generator=rng)
        save_image((g(z) + 1) / 2, run.path / "samples.png", nrow=8, padding=2)
        ends = torch.randn(2, 8, cfg.z_dim, generator=rng)
        t = torch.linspace(0, 1, 10).view(1, 10, 1)
        path = ends[0].unsqueeze(1) * (1 - t) + ends[1].unsqueeze(1) * t  # (8 rows, 10 steps, z)
        save_image((g(path.reshape(80, -1)) + 1) / 2, run.path / "interpolation.png", nrow=10, padding=2)
    return out + [run.path / "samples.png", run.path / "interpolation.png"]


def test_metrics(run: RunDir, cfg: DCGANTrainConfig, context: RunContext | None = None) -> dict[str, Any]:
    """The finished generator (generator.pt, the EMA one where kept) against the test split, once: FID with the
    driver's Inception weights, else the stats_fd fallback (labelled: it is not FID)."""
    from cifarray.eval import fid as fid_lib

    g = Generator(cfg.model_config())
    load_state_into(g, run.path / "generator.pt", "the generator's weights", RETRAIN)
    test = cfg.data_source().load().test.images  # uint8, N x 3 x 32 x 32
    weights = context and context.fid_weights
    if weights:
        samples = fid_lib.sample_generator(g, cfg.fid_samples, cfg.z_dim, seed=cfg.seed)
        return {"test_fid": fid_lib.compute(samples, test, split="test",
                                            weights=fid_lib.InceptionWeights(Path(weights[0]), weights[1]))["fid"]}
    n = min(STATS_SAMPLES, len(test))
    real = torch.from_numpy(test[:n]).float() / 255
    return {"test_stats_fd": stats_fd(fid_lib.sample_generator(g, n, cfg.z_dim, seed=cfg.seed).float() / 255, real),
            "test_fid": None, "test_fid_note": "no Inception weights: stats_fd (NOT FID); FID: python -m "
                                               f"cifarray.eval fid {run.path} --inception-weights PATH"}


def _log_fields(s: State) -> dict[str, Any]:
    return {"lr_g": s.worker.cfg.lr_g}


FAMILY = Family(
    name="dcgan", config=DCGANTrainConfig, driver_context=fid_weights_for_training,
    pieces=Pieces(build=build, step=step, evaluate=evaluate, finish=finish, begin=begin, eval_now=evaluates_at,
                  log_fields=_log_fields, metric_fields=("loss_d", "loss_g", "d_real", "d_fake", "fid", "stats_fd",
                                                         "lr_g")),
    sweep=SweepSpec(objective=objective, rules=Widths(), test_metrics=test_metrics),
    display=Display(figures=report, description="the DCGAN (CIFAR-100, <= 1M params)",
                    progress_keys=("loss_d", "loss_g", "d_real", "d_fake", "fid", "images_per_s"),
                    summary_keys=("params_g", "params_d", "steps", "seconds", "images_per_s", "best_fid",
                                  "best_fid_step")),
)
