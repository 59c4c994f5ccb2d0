"""Whole-step CUDA graphs: a training step's forward, backward and optimizer update, captured once and
replayed, so that a step costs one launch from the host instead of ~1,400.

What PyTorch's CUDA-graph notes ask for, and where it is done here:
- static inputs: `GraphedStep` owns one buffer per input and copies each step's tensors into them;
- warm-up on a side stream before capture (`warmup` eager steps, which are real training steps);
- no host syncs and no host values that change inside the graph: the learning rate is read from a
  device tensor (`sgd_step`), which the caller refills from the host schedule before each replay;
- batch norm's running statistics and step counters are updated in place, which replays do too.

`GraphedStep(capture=False)` runs the same static-buffer path without a graph. The CPU tests use it
to check what does not need CUDA: that every step trains on its own inputs (a graph that replays
stale inputs would not) and that `sgd_step` equals torch.optim.SGD.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from cifarray.phases import mark

MODES = ("auto", "on", "off")


def resolve(mode: str, *, cuda: bool, workers: int, compiled: bool, unsupported: str = "",
            validated: bool = False) -> tuple[bool, str]:
    """(use graphs, why not) for --cuda-graphs; `unsupported` names a family setting graphs cannot run.

    `auto` uses them only for a family whose graphed step a GPU run has shown to train like its eager one
    (`validated`: the family's config says so, with the measurement in docs/BENCHMARKS.md). `on` where it
    cannot work is refused by the config before Ray starts."""
    if mode == "off":
        return False, "--cuda-graphs off"
    reasons = [why for bad, why in ((not cuda, "no GPU"), (workers > 1, "several workers (DDP)"),
                                    (compiled, "--compile"), (bool(unsupported), unsupported)) if bad]
    if reasons:
        return False, ", ".join(reasons)
    if mode == "auto" and not validated:
        return False, "auto: not yet validated on a GPU for this model (pass --cuda-graphs on to use them)"
    return True, ""


@torch.no_grad()
def sgd_step(opt: torch.optim.SGD, lr: torch.Tensor) -> None:
    """torch.optim.SGD's update (momentum, dampening 0, Nesterov or not, weight decay per group) with the
    learning rate taken from the device tensor `lr`, so that a captured graph follows the schedule.

    Momentum buffers must exist (one eager `opt.step()` creates them): a graph cannot branch on that.
    """
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params]
        bufs = [opt.state[p]["momentum_buffer"] for p in params]
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        momentum = group["momentum"]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        update = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_sub_(params, torch._foreach_mul(update, lr))


class GraphedStep:
    """`fn(*inputs) -> outputs` (tensors), called on static copies of its inputs and, on CUDA, replayed
    from one captured graph after `warmup` eager calls. Returns the static outputs: read or copy them
    before the next call.

    When capture fails, it says why in one line (`on_fallback`) and calls `fn` eagerly from then on.
    """

    def __init__(self, fn: Callable[..., Sequence[torch.Tensor]], *, capture: bool, warmup: int = 3,
                 on_fallback: Callable[[str], None] = print):
        self.fn, self.capture, self.warmup, self.on_fallback = fn, capture, warmup, on_fallback
        self.static: list[torch.Tensor] | None = None
        self.outputs: Sequence[torch.Tensor] = ()
        self.graph = None
        self.calls = 0
        self.failed = ""  # why capture failed, if it did

    def _eager(self) -> Sequence[torch.Tensor]:
        if not self.capture:
            return self.fn(*self.static)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.fn(*self.static)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self) -> bool:
        mark("graph_capture")
        try:
            graph = torch.cuda.CUDAGraph()
            # thread_local: Ray's own threads may touch CUDA while this one captures.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.outputs = self.fn(*self.static)
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager, said once
            self.capture = False
            self.failed = f"capture failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})"
            self.on_fallback(f"cuda graphs: {self.failed}; training eagerly")
            return False
        self.graph = graph
        mark("graph_captured")
        return True

    def __call__(self, *inputs: torch.Tensor) -> Sequence[torch.Tensor]:
        if self.static is None:
            self.static = [x.clone() for x in inputs]
        else:
            for buffer, x in zip(self.static, inputs, strict=True):
                buffer.copy_(x, non_blocking=True)
        self.calls += 1
        if self.graph is None and self.capture and self.calls > self.warmup:
            self._capture()  # records without running anything: the replay below is this call's step
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        self.outputs = self._eager()
        return self.outputs


def describe(graphed: GraphedStep | None, off_because: str) -> dict[str, object]:
    """summary.json's record of the graph path: used or not, and why."""
    if graphed is None:
        note = off_because
    elif graphed.graph is not None:
        note = f"captured after {graphed.warmup} eager steps"
    else:
        note = graphed.failed or "static buffers without a graph (CPU emulation)"
    return {"cuda_graphs": graphed is not None and graphed.graph is not None, "cuda_graphs_note": note}
