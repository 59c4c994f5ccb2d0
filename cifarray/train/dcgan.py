"""DCGAN training, one function per Ray Train worker (1 CPU process or N GPU ranks alike).

The paper's objective: sigmoid + BCE (as BCEWithLogits) with one-sided label
smoothing (real targets 1 - s) and optional noisy real labels; Adam with beta1 =
0.5. A hinge loss is available for sweeps. A grid of samples from a fixed latent
batch is saved at step 0 and at every evaluation (samples/step_XXXXXXX.png).
"""

from __future__ import annotations

import copy
import math
import os
import socket
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from cifarray.config import from_dict
from cifarray.data.loader import ShardedBatches, prepare
from cifarray.metrics import stats_fd
from cifarray.models.dcgan import Discriminator, Generator, discriminator_params, generator_params
from cifarray.train import common
from cifarray.train.config import DCGANTrainConfig

METRIC_FIELDS = ["step", "loss_d", "loss_g", "d_real", "d_fake", "fid", "stats_fd", "lr_g", "images_per_s", "seconds",
                 "attempt"]
GRID = 64  # 8 x 8 samples
STATS_SAMPLES = 1000  # generated and real images per stats_fd (~0.1 s on a CPU)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return (x.float() + 1) / 2  # generator output in [-1, 1] -> [0, 1]


def save_grid(g: torch.nn.Module, z: torch.Tensor, path: str) -> None:
    was = g.training
    g.eval()
    with torch.no_grad():
        save_image(to_unit(g(z)).clamp(0, 1), path, nrow=8, padding=2)
    g.train(was)


def fid_weights_for_training(cfg: DCGANTrainConfig) -> list[str] | None:
    """Driver side: [safe weights path, sha256] for FID during training, or None (with a notice) if unavailable.

    Resolved once here, so workers neither re-hash the file at every evaluation nor cache the
    reference statistics a second time under the safe copy's hash."""
    from cifarray.errors import UserError
    from cifarray.eval import fid

    if cfg.fid_every == -1:
        return None
    try:
        return [str(p) for p in fid.resolve_weights(cfg.inception_weights)]
    except UserError as exc:
        if cfg.inception_weights:
            raise  # asked for explicitly: a wrong path is an error
        print(f"FID during training: off ({exc})", flush=True)
        return None


def train_dcgan(config: dict) -> None:
    import ray.train.torch

    fid_weights = config.get("_fid_weights")  # [path, sha256] from fid_weights_for_training
    cfg = from_dict(DCGANTrainConfig, config)
    run = common.RunDir(cfg.out)
    device, rank, world = common.setup_worker(cfg)
    precision = common.resolve_precision(cfg.precision, device)
    attempt = common.next_attempt(run) if rank == 0 else 0
    prepared = prepare(common.load_data(cfg), val_size=cfg.val_size, seed=cfg.seed, device=device)
    train = prepared.train
    # A sweep selects on validation images; the test split stays unseen until the paper-style FID afterwards.
    reference_name = "val" if config.get("_sweep_trial") else "test"
    reference = prepared.val if reference_name == "val" else prepared.test
    fid_every = 0 if fid_weights is None else (cfg.fid_every or cfg.eval_every)
    best = run.read_json("best_fid.json")  # survives restarts: the best generator so far is kept
    mc = cfg.model_config()

    torch.manual_seed(cfg.seed)
    g, d = Generator(mc).to(device), Discriminator(mc).to(device)
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, 0.999))
    ema = copy.deepcopy(g).requires_grad_(False) if cfg.ema else None
    sampler = ShardedBatches(len(train), cfg.batch_size, rank=rank, world=world, seed=cfg.seed)
    fixed_z = torch.randn(GRID, cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(device)
    gen = torch.Generator(device=device)

    stateful = {"g": g, "d": d, "opt_g": opt_g, "opt_d": opt_d, "sampler": sampler}
    if ema is not None:
        stateful["ema"] = ema
    start = common.restore(stateful)
    gen.manual_seed(common.augment_seed(cfg.seed, rank, start))
    samples_dir = run.path / "samples"
    if rank == 0:
        samples_dir.mkdir(exist_ok=True)
        if start == 0:
            save_grid(ema or g, fixed_z, str(samples_dir / "step_0000000.png"))  # the untrained baseline

    g_ddp = ray.train.torch.prepare_model(g, move_to_device=False)
    d_ddp = ray.train.torch.prepare_model(d, move_to_device=False)
    if cfg.compile:
        g_ddp, d_ddp = torch.compile(g_ddp), torch.compile(d_ddp)
    log = common.MetricsLog(run.metrics, METRIC_FIELDS)
    if rank == 0:
        log.truncate_after(start)
    common.write_worker_info(run, rank, pid=os.getpid(), host=socket.gethostname(), start_step=start,
                             attempt=attempt)

    per_rank = cfg.batch_size // world
    real_target = torch.full((per_rank,), 1.0 - cfg.label_smoothing, device=device)
    fake_target = torch.zeros(per_rank, device=device)
    sums = torch.zeros(4, device=device)  # loss_d, loss_g, D(real), D(fake)
    window_start, window_steps = time.perf_counter(), 0
    for step in range(start + 1, cfg.steps + 1):
        idx = sampler.next().to(device)
        real = train.images[idx].float().div_(127.5).sub_(1.0)
        if cfg.flip:
            flip = torch.rand(per_rank, device=device, generator=gen) < 0.5
            real = torch.where(flip.view(-1, 1, 1, 1), real.flip(-1), real)
        z = torch.randn(per_rank, cfg.z_dim, device=device, generator=gen)
        with common.autocast(device, precision):
            fake = g_ddp(z)
            d_real, d_fake = d_ddp(real).float(), d_ddp(fake.detach()).float()
            if cfg.loss == "bce":
                target = real_target
                if cfg.label_noise:
                    target = (target + cfg.label_noise * torch.randn(per_rank, device=device, generator=gen)).clamp(0, 1)
                loss_d = F.binary_cross_entropy_with_logits(d_real, target) + \
                    F.binary_cross_entropy_with_logits(d_fake, fake_target)
            else:
                loss_d = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        with common.autocast(device, precision):
            d_gen = d_ddp(fake).float()
            if cfg.loss == "bce":
                loss_g = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
            else:
                loss_g = -d_gen.mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()  # also leaves gradients in D; opt_d.zero_grad clears them next step
        opt_g.step()
        if ema is not None:
            with torch.no_grad():
                for pe, pg in zip(ema.parameters(), g.parameters()):
                    pe.lerp_(pg, 1 - cfg.ema)
                for be, bg in zip(ema.buffers(), g.buffers()):
                    be.copy_(bg)
        sums += torch.stack([loss_d.detach(), loss_g.detach(), torch.sigmoid(d_real).mean().detach(),
                             torch.sigmoid(d_fake).mean().detach()])
        window_steps += 1

        is_last = step == cfg.steps
        ckpt_now = step % cfg.checkpoint_every == 0 or is_last
        if not (step % cfg.log_every == 0 or ckpt_now or step % cfg.eval_every == 0):
            continue
        means = [v / (window_steps * world) for v in common.all_reduce_sum(sums.tolist(), device)]
        elapsed = time.perf_counter() - window_start
        if not all(math.isfinite(v) for v in means):
            common.stop_diverged(run, step, means[0] if not math.isfinite(means[0]) else means[1], rank)
            return
        row = {"step": step, "loss_d": means[0], "loss_g": means[1], "d_real": means[2], "d_fake": means[3],
               "lr_g": cfg.lr_g, "images_per_s": window_steps * cfg.batch_size / max(elapsed, 1e-9),
               "seconds": elapsed, "attempt": attempt}
        if rank == 0:
            from cifarray.eval import fid as fid_lib

            if step % cfg.eval_every == 0 or is_last:
                # Offline sanity signal (not FID): distance of low-order image statistics to real images.
                n = min(STATS_SAMPLES, len(reference))
                row["stats_fd"] = stats_fd(fid_lib.sample_generator(ema or g, n, cfg.z_dim, seed=cfg.seed).float() / 255,
                                           reference.images[:n].float().cpu() / 255)
            if fid_every and (step % fid_every == 0 or is_last):
                samples = fid_lib.sample_generator(ema or g, cfg.fid_samples, cfg.z_dim, seed=cfg.seed)
                weights = fid_lib.InceptionWeights(Path(fid_weights[0]), fid_weights[1])
                row["fid"] = fid_lib.compute(samples, reference.images.cpu().numpy(), split=reference_name,
                                             weights=weights)["fid"]
                if best is None or row["fid"] < best["fid"]:
                    best = {"step": step, "fid": row["fid"], "samples": cfg.fid_samples, "reference": reference_name}
                    torch.save((ema or g).state_dict(), run.path / "generator_best.pt")
                    run.write_json("best_fid.json", best)
            log.append(row)
            if step % cfg.eval_every == 0 or is_last:
                save_grid(ema or g, fixed_z, str(samples_dir / f"step_{step:07d}.png"))
        state = None
        if ckpt_now:
            state = common.snapshot(stateful, step)
            gen.manual_seed(common.augment_seed(cfg.seed, rank, step))
        if is_last:
            break  # the final report comes after the final files (below)
        if ckpt_now or step % cfg.eval_every == 0:  # a report is a round trip to the controller
            common.report(run, row, state, rank)
        sums.zero_()
        window_steps, window_start = 0, time.perf_counter()

    common.write_worker_info(run, rank, params_sha256=common.params_sha256(g), final_step=cfg.steps)
    if rank == 0:
        torch.save((ema or g).state_dict(), run.path / "generator.pt")
        torch.save(d.state_dict(), run.path / "discriminator.pt")
        rows = common.read_metrics(run.metrics)
        seconds = sum(float(r["seconds"]) for r in rows)
        gp, dp = generator_params(mc), discriminator_params(mc)
        run.write_json("summary.json", {
            "model": "dcgan", "status": "complete", "params_g": gp, "params_d": dp, "params": gp + dp,
            "steps": cfg.steps, "workers": world, "batch_size": cfg.batch_size, "seconds": round(seconds, 2),
            "images_per_s": round(cfg.steps * cfg.batch_size / max(seconds, 1e-9), 1),
            "loss": cfg.loss, "ema": cfg.ema, "samples": str(samples_dir), "seed": cfg.seed,
            "precision": precision,
            "best_fid": best and best["fid"], "best_fid_step": best and best["step"],
            "fid_during_training": (f"every {fid_every} steps, {cfg.fid_samples} samples vs the {reference_name} split"
                                    + (" (procedural data)" if cfg.synthetic else "")) if fid_every
            else "off (no Inception weights)",
            "final": {k: float(rows[-1][k]) for k in ("loss_d", "loss_g", "d_real", "d_fake")} if rows else {},
            **common.provenance(device),
        })
    if start < cfg.steps:
        # Last, so that whoever acts on the final result (Tune's scheduler may end the trial on it) finds
        # the generator and summary.json already written.
        common.report(run, row, state, rank)
