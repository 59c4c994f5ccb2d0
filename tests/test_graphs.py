"""The CUDA-graph path: what the CPU can check (static buffers, the device-lr SGD, fallback, refusals),
and, where CUDA exists, that the captured step trains like eager."""

from __future__ import annotations

import pytest
import torch

from cifarray.data.cifar import load_cifar100
from cifarray.data.loader import prepare, random_data
from cifarray.data.synth import write_synthetic
from cifarray.errors import UserError
from cifarray.train import densenet, graphs
from cifarray.train.config import DCGANTrainConfig, DenseNetTrainConfig
from cifarray.train.engine import Worker
from conftest import run_cli_here


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_step_with_a_device_learning_rate_equals_torch_sgd(nesterov):
    ours, ref = _model(), _model()
    kw = dict(lr=0.1, momentum=0.9, nesterov=nesterov)
    groups = lambda m: [{"params": [p for p in m.parameters() if p.ndim > 1], "weight_decay": 5e-4},  # noqa: E731
                        {"params": [p for p in m.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    opt_ours, opt_ref = torch.optim.SGD(groups(ours), **kw), torch.optim.SGD(groups(ref), **kw)
    for group in opt_ours.param_groups:
        for p in group["params"]:
            opt_ours.state[p]["momentum_buffer"] = torch.zeros_like(p)
    lr = torch.tensor(0.0)
    g = torch.Generator().manual_seed(1)
    for i, rate in enumerate([0.1, 0.05, 0.2, 0.01, 0.3]):  # a changing schedule
        x, y = torch.randn(16, 6, generator=g), torch.randint(3, (16,), generator=g)
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            for group in opt.param_groups:
                group["lr"] = rate
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
        lr.fill_(rate)
        graphs.sgd_step(opt_ours, lr)
        opt_ref.step()
        for a, b in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(next(ours.parameters()), next(_model().parameters()))  # it did train


def _state(cfg: DenseNetTrainConfig, graphed: bool, tmp):
    data = random_data(512)
    torch.manual_seed(0)
    state = densenet.build(cfg, Worker.local(cfg, data, tmp, torch.device("cpu"), "fp32"))
    if graphed:
        densenet.enable_graphs(state, capture=False)
    return state


def test_graphed_path_trains_each_step_on_its_own_batch_like_eager(tmp_path):
    """The static-buffer path (GraphedStep without a graph, as on the CPU) against the eager step: the same
    losses step for step. A path that kept training on its first batch (stale inputs) or read a stale
    learning rate would drift within a few steps."""
    cfg = DenseNetTrainConfig(synthetic=True, batch_size=32, growth_rate=4, blocks=(1, 1), steps=12, augment="basic",
                              augment_chunk=3, cuda_graphs="off")
    eager, graphed = _state(cfg, False, tmp_path), _state(cfg, True, tmp_path)
    losses = {}
    for name, state in (("eager", eager), ("graphed", graphed)):
        losses[name] = [float(densenet.step(state, state.worker.sampler.next())["loss"]) for _ in range(cfg.steps)]
    torch.testing.assert_close(losses["graphed"], losses["eager"], rtol=1e-4, atol=1e-5)
    assert len(set(losses["eager"])) == cfg.steps  # each step saw another batch
    emulated = "static buffers without a graph (CPU emulation)"
    assert graphs.describe(graphed.graphed, "") == {"cuda_graphs": False, "cuda_graphs_note": emulated}
    assert graphs.describe(eager.graphed, eager.graphs_off_because) == {"cuda_graphs": False,
                                                                        "cuda_graphs_note": "--cuda-graphs off"}


def test_graphed_step_falls_back_to_eager_in_one_line_when_capture_fails():
    said = []
    calls = []

    def fn(x):
        calls.append(x.clone())
        return (x * 2,)

    step = graphs.GraphedStep(fn, capture=True, warmup=0, on_fallback=said.append)
    if torch.cuda.is_available():
        pytest.skip("capture can succeed here")
    out = [step(torch.full((2,), float(i)))[0].clone() for i in range(3)]
    assert [o.tolist() for o in out] == [[0.0, 0.0], [2.0, 2.0], [4.0, 4.0]]  # every step ran, eagerly
    assert len(said) == 1 and said[0].startswith("cuda graphs: capture failed (") and said[0].endswith(
        "; training eagerly") and "\n" not in said[0]
    assert step.graph is None and step.failed


def test_cuda_graphs_setting_resolves_and_refuses_in_one_line():
    assert graphs.resolve("auto", cuda=False, workers=1, compiled=False) == (False, "no GPU")
    assert graphs.resolve("auto", cuda=True, workers=1, compiled=False) == (
        False, "auto: not yet validated on a GPU for this model (pass --cuda-graphs on to use them)")
    assert graphs.resolve("auto", cuda=True, workers=1, compiled=False, validated=True) == (True, "")
    # auto: on for the DenseNet (its graphed 10,000 steps on an H200 trained as eager did), not yet for the DCGAN
    assert DenseNetTrainConfig(synthetic=True).graphs(cuda=True) == (True, "")
    assert DenseNetTrainConfig(synthetic=True).graphs(cuda=True, workers=2) == (False, "several workers (DDP)")
    assert DenseNetTrainConfig(synthetic=True).graphs(cuda=False) == (False, "no GPU")
    assert DCGANTrainConfig(synthetic=True).graphs(cuda=True)[0] is False
    assert graphs.resolve("on", cuda=True, workers=1, compiled=False) == (True, "")
    assert graphs.resolve("on", cuda=True, workers=2, compiled=True, unsupported="--optimizer adamw")[1] == \
        "several workers (DDP), --compile, --optimizer adamw"
    assert DenseNetTrainConfig(synthetic=True, optimizer="adamw", cuda_graphs="auto").graphs(cuda=True) == \
        (False, "--optimizer adamw")
    with pytest.raises(UserError, match="not one of auto, on, off"):
        DenseNetTrainConfig(synthetic=True, cuda_graphs="yes")
    result = run_cli_here("cifarray.train", "densenet", "--synthetic", "--cuda-graphs", "on", "--out", "/nonexistent/x")
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --cuda-graphs on cannot be used here (no GPU): graphs need --gpu, --workers 1 and no --compile "
        "(densenet: --optimizer sgd); pass --cuda-graphs off or auto")
    assert "Traceback" not in result.stderr and "ray" not in result.stdout.lower()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_step_trains_like_eager_on_a_gpu(tmp_path):
    """Where CUDA exists: 300 steps of a small DenseNet on procedural data, captured vs eager, same seed,
    batches and augmentation. The loss curves agree within noise (bf16 and kernel choice make them
    differ in the last digits), and both learn."""
    write_synthetic(tmp_path, train_per_class=60, test_per_class=10, seed=0, difficulty="hard")
    device = torch.device("cuda")
    data = prepare(load_cifar100(tmp_path, verify=False), val_size=500, seed=0, device=device)
    curves = {}
    for mode in ("off", "on"):
        cfg = DenseNetTrainConfig(synthetic=True, batch_size=128, growth_rate=8, blocks=(2, 2, 2), steps=300,
                                  gpu=True, augment="basic", cuda_graphs=mode)
        torch.manual_seed(0)
        state = densenet.build(cfg, Worker.local(cfg, data, tmp_path, device, "bf16"))
        assert (state.graphed is not None) == (mode == "on")
        curves[mode] = torch.stack([densenet.step(state, state.worker.sampler.next())["loss"].clone()
                                    for _ in range(cfg.steps)]).cpu()
        if mode == "on":
            assert state.graphed.graph is not None, state.graphed.failed
    last = {mode: curve[-50:].mean().item() for mode, curve in curves.items()}
    assert abs(last["on"] - last["off"]) < 0.05 * last["off"], last
    assert last["on"] < 0.9 * curves["on"][:10].mean().item(), last  # it learned


def test_dcgan_graphed_path_trains_like_eager(tmp_path):
    """The DCGAN's D+G step (with EMA and noisy real labels) through GraphedStep's static buffers, against
    eager: the same four metrics step for step, and the draws (flips, latents, label noise) stay outside."""
    from cifarray.train import dcgan
    from cifarray.train.config import DCGANTrainConfig

    cfg = DCGANTrainConfig(synthetic=True, batch_size=16, steps=8, g_widths=(32, 16, 8, 8), d_widths=(8, 8, 16, 32),
                           ema=0.9, label_noise=0.05, cuda_graphs="off")
    runs = {}
    for graphed in (False, True):
        data = random_data(256)
        torch.manual_seed(0)
        state = dcgan.build(cfg, Worker.local(cfg, data, tmp_path, torch.device("cpu"), "fp32"))
        if graphed:
            dcgan.enable_graphs(state, capture=False)
        runs[graphed] = [[float(v) for v in dcgan.step(state, state.worker.sampler.next()).values()]
                         for _ in range(cfg.steps)]
        runs[f"ema{graphed}"] = next(state.ema.parameters()).detach().clone()
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runs["emaTrue"], runs["emaFalse"])
    assert len({r[0] for r in runs[False]}) == cfg.steps
