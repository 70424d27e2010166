"""The seeds of one norm trained together: one vmapped model, one Adam, one step per batch.

On a GPU one LeNet-5 at batch 64 leaves most of the chip idle: a step is dozens
of tiny kernels. S runs of the same norm, stacked with
``torch.func.stack_module_state``, train as one model over (S, B, ...)
batches, so each kernel does S runs' work for one launch (and on CUDA the
stacked step is one graph replay, as a single run's is). Nothing about a run
changes: slice s has its own initial weights (its seed), its own data order
(``DeviceLoader.stacked_batches``), its own batch-norm statistics (bnlab's
vmap rule folds the stacked dim into the channels, running buffers per
slice), its own Adam state (Adam is elementwise, so one Adam over stacked
tensors is S Adams), its own loss and accuracy, and its own checkpoint in
the format of a run trained alone, so either way can resume it. In float64
a stacked run and the same run alone agree to rounding
(``tests/test_experiment_stacked.py``).

Runs are stacked when ``--stack`` says so (unset: on CUDA), for the norms
whose layers are vmapped exactly (``STACKABLE``), in float32 (not under
``--amp``), and only runs that have trained the same number of epochs. The
model is plain LeNet-5, without the CPU's fused ReLU + pooling and direct
convolutions. A run's ``train_seconds`` and ``eval_seconds`` are those of the
stacked epoch it shared.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.data import CIFAR10, DeviceLoader
from bnlab.experiments.config import Config
from bnlab.experiments.results import save_checkpoint
from bnlab.experiments.runner import EpochDone, Task
from bnlab.experiments.train import (
    CUDAGraphStep,
    EpochResult,
    MakeBar,
    build_optimizer,
    checkpoint_state,
    make_test_loader,
    memory_formats,
    resolve_device,
    terminal_bar,
)
from bnlab.models import LeNet5

STACKABLE = ("bn", "none")


def groups(
    cfg: Config, tasks: list[Task], device: torch.device
) -> tuple[list[list[Task]], list[Task]]:
    """(groups of two or more runs to train stacked, the runs to train alone)."""
    on = cfg.stack if cfg.stack is not None else device.type == "cuda"
    if not on or cfg.amp != "off":
        return [], list(tasks)
    by_key: dict[tuple[str, int], list[Task]] = {}
    for task in tasks:
        done = task.state["epochs_done"] if task.state is not None else 0
        by_key.setdefault((task.norm, done), []).append(task)
    stacked = [g for (norm, _), g in by_key.items() if norm in STACKABLE and len(g) > 1]
    alone = [t for t in tasks if not any(t in g for g in stacked)]
    return stacked, alone


class StackedModel:
    """S models of one architecture as stacked parameters and buffers, called through vmap."""

    def __init__(self, models: list[nn.Module]) -> None:
        self.size = len(models)
        self.keys = list(models[0].state_dict())
        self.params, self.buffers = torch.func.stack_module_state(models)
        self.base = copy.deepcopy(models[0]).to("meta")  # the architecture, without storage

    def train(self, mode: bool = True) -> None:
        self.base.train(mode)

    def __call__(self, x: Tensor, shared: bool = False) -> Tensor:
        """Logits (S, B, classes) of x (S, B, ...), or of one batch for all (``shared``)."""

        def call(params, buffers, inputs):
            return torch.func.functional_call(self.base, (params, buffers), (inputs,))

        dims = (0, 0, None if shared else 0)
        return torch.func.vmap(call, in_dims=dims)(self.params, self.buffers, x)

    def state_dict(self, s: int) -> dict[str, Tensor]:
        """Model s's state, as ``models[s].state_dict()`` would give it."""
        both = {**self.params, **self.buffers}
        return {key: both[key][s].detach().clone() for key in self.keys}


def split_optimizer_state(state: dict[str, Any], s: int) -> dict[str, Any]:
    """Run s's part of a stacked Adam's state dict: what Adam over its model alone holds."""
    return {
        "state": {
            i: {k: v if k == "step" else v[s].clone() for k, v in st.items()}
            for i, st in state["state"].items()
        },
        "param_groups": copy.deepcopy(state["param_groups"]),
    }


def stack_optimizer_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The stacked Adam state of runs' own states (which have taken the same steps)."""
    first = states[0]
    return {
        "state": {
            i: {
                k: v if k == "step" else torch.stack([s["state"][i][k] for s in states])
                for k, v in st.items()
            }
            for i, st in first["state"].items()
        },
        "param_groups": first["param_groups"],
    }


def stacked_step(model: StackedModel, optimizer: torch.optim.Optimizer):
    """The training step of every run at once; returns each run's mean loss (S,), detached."""

    def step(x: Tensor, y: Tensor) -> Tensor:
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        loss = loss.view(y.shape).mean(1)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # run s's loss depends on run s's parameters alone
        optimizer.step()
        return loss.detach()

    return step


@torch.inference_mode()
def evaluate(model: StackedModel, loader: DeviceLoader) -> list[float]:
    """Each run's test accuracy, in percent."""
    model.train(False)
    correct = torch.zeros(model.size, dtype=torch.int64, device=loader.device)
    seen = 0
    for x, y in loader:
        correct += (model(x, shared=True).argmax(-1) == y).sum(1)
        seen += len(y)
    return (100.0 * correct.double() / seen).tolist()


def build(
    tasks: list[Task], device: torch.device, fmt: torch.memory_format, steps_per_epoch: int
) -> StackedModel:
    """The stacked model of `tasks` (each run's weights from its seed or its checkpoint)."""
    models = []
    for task in tasks:
        torch.manual_seed(task.seed)
        model = LeNet5(task.norm, renorm_warmup=steps_per_epoch).to(
            device=device, memory_format=fmt
        )
        if task.state is not None:
            model.load_state_dict(task.state["model"])
        models.append(model)
    return StackedModel(models)


def train_stacked(
    cfg: Config, tasks: list[Task], data: CIFAR10, make_bar: MakeBar = terminal_bar
) -> Iterator[EpochDone]:
    """Train `tasks` (one norm, the same epochs done) together; yield each run's epochs,
    each once its checkpoint is saved."""
    device = resolve_device(cfg.device)
    norm, seeds = tasks[0].norm, [t.seed for t in tasks]
    model_fmt, data_fmt = memory_formats(cfg, norm, device)
    n_train = len(data.train_images) if cfg.limit_train is None else cfg.limit_train
    loader = DeviceLoader(
        data.train_images[:n_train], data.train_labels[:n_train],
        batch_size=cfg.batch_size, seed=seeds[0], device=device, memory_format=data_fmt,
    )  # fmt: skip
    test_loader = make_test_loader(data, cfg, device, data_fmt)
    model = build(tasks, device, model_fmt, len(loader))
    use_graph = cfg.cuda_graph and device.type == "cuda"
    optimizer = build_optimizer(model.params.values(), cfg.lr, capturable=use_graph)
    states = [t.state for t in tasks]
    done = states[0]["epochs_done"] if states[0] is not None else 0
    histories = [list(s["history"])[:done] if s is not None else [] for s in states]
    if done:
        optimizer.load_state_dict(stack_optimizer_states([s["optimizer"] for s in states]))
    step = stacked_step(model, optimizer)
    step = CUDAGraphStep(step) if use_graph else step

    for epoch in range(done, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        total = torch.zeros(len(tasks), device=device)
        seen = 0
        bar = make_bar(len(loader), f"{norm} seeds {seeds} epoch {epoch + 1}/{cfg.epochs}")
        try:
            for x, y in loader.stacked_batches(seeds, epoch):
                total += step(x, y) * y.shape[1]
                seen += y.shape[1]
                bar.update(1)
        finally:
            bar.close()
        losses = (total / seen).tolist()  # a sync: the epoch's steps are done
        t1 = time.perf_counter()
        accuracies = evaluate(model, test_loader)
        t2 = time.perf_counter()
        optimizer_state = optimizer.state_dict()
        for s, task in enumerate(tasks):
            result = EpochResult(epoch + 1, losses[s], accuracies[s], t1 - t0, t2 - t1, t2 - t0)
            histories[s].append(dataclasses.asdict(result))
            state = checkpoint_state(
                norm, task.seed, model.state_dict(s),
                split_optimizer_state(optimizer_state, s), histories[s], device,
            )  # fmt: skip
            save_checkpoint(task.checkpoint, state)  # first: it alone is enough to resume
            yield EpochDone(task.index, result, state["history"])
