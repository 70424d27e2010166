"""Runs of one norm trained stacked (one vmapped model) against the same runs alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from bnlab.data import DeviceLoader
from bnlab.experiments import run_compare
from bnlab.experiments.results import checkpoint_path, load_checkpoint
from bnlab.experiments.runner import Task
from bnlab.experiments.stacked import (
    StackedModel,
    evaluate,
    groups,
    split_optimizer_state,
    stack_optimizer_states,
    stacked_step,
)
from bnlab.experiments.train import build_optimizer, eager_step
from bnlab.models import LeNet5

from .conftest import count_calls
from .test_experiment_compare import config, interrupted_then_resumed, numbers, quiet
from .test_experiment_train import tiny_cifar

pytestmark = pytest.mark.usefixtures("one_thread")
SEEDS = (0, 1, 2)


def _model(norm: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return LeNet5(norm).double()


def test_stacked_batches_are_each_seeds_own():
    data = tiny_cifar(n_train=150, n_test=10)
    loader = DeviceLoader(data.train_images, data.train_labels, batch_size=32, seed=0)
    stacked = list(loader.stacked_batches(SEEDS, epoch=3))
    for s, seed in enumerate(SEEDS):
        alone = DeviceLoader(data.train_images, data.train_labels, batch_size=32, seed=seed)
        alone.set_epoch(3)
        batches = list(alone)
        assert len(batches) == len(stacked)
        for (x, y), (xs, ys) in zip(batches, stacked, strict=True):
            assert torch.equal(x, xs[s]) and torch.equal(y, ys[s])


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_stacked_steps_match_the_runs_alone_in_float64(norm):
    data = tiny_cifar(n_train=160, n_test=40)
    loader = DeviceLoader(data.train_images, data.train_labels, batch_size=32, seed=0)
    alone = [_model(norm, seed) for seed in SEEDS]
    optimizers = [build_optimizer(m, 0.01) for m in alone]
    steps = [eager_step(m, o) for m, o in zip(alone, optimizers, strict=True)]
    stack = StackedModel([_model(norm, seed) for seed in SEEDS])
    optimizer = build_optimizer(stack.params.values(), 0.01)
    step = stacked_step(stack, optimizer)
    for x, y in loader.stacked_batches(SEEDS, epoch=0):  # all in training mode, as built
        losses = step(x.double(), y)
        for s in range(len(SEEDS)):
            loss = steps[s](x[s].double(), y[s])
            torch.testing.assert_close(losses[s], loss, atol=1e-10, rtol=0)
    for s, m in enumerate(alone):
        ours, theirs = stack.state_dict(s), m.state_dict()
        assert list(ours) == list(theirs)
        for k in theirs:
            tol = 1e-6 if norm == "bn" and _noise_driven(k) else 1e-10
            torch.testing.assert_close(ours[k], theirs[k], atol=tol, rtol=0, msg=k)
        split, own = split_optimizer_state(optimizer.state_dict(), s), optimizers[s].state_dict()
        assert split["param_groups"] == own["param_groups"]
        for i, st in own["state"].items():
            for k, v in st.items():
                torch.testing.assert_close(split["state"][i][k], v, atol=1e-10, rtol=0)
    test = DeviceLoader(data.test_images, data.test_labels, batch_size=16, shuffle=False)
    accuracy = evaluate(_Double(stack), test)
    for s, m in enumerate(alone):
        m.eval()
        with torch.no_grad():
            correct = sum(int((m(x.double()).argmax(1) == y).sum()) for x, y in test)
        assert accuracy[s] == pytest.approx(100.0 * correct / 40)


def _noise_driven(key: str) -> bool:
    """A bias just before a batch norm, or a running mean that follows it. The bias's
    gradient is 0 but for rounding (the norm takes the mean out), and Adam divides a
    gradient by its own size plus eps = 1e-8, so each side's rounding noise, 1e-16 of
    the summed terms (1e-16 to 1e-14 here), moves those biases by lr·noise/eps, 1e-10
    to 1e-8 per step, differently on each side. Compared at 1e-6 (the other values at
    rounding level)."""
    layer, _, name = key.rpartition(".")
    return (layer.endswith(".0") and name == "bias") or name == "running_mean"


class _Double:
    """The stacked model on float64 inputs (the loaders give float32)."""

    def __init__(self, stack):
        self.stack, self.size = stack, stack.size

    def train(self, mode=True):
        self.stack.train(mode)

    def __call__(self, x, shared=False):
        return self.stack(x.double(), shared)


def test_optimizer_states_stack_and_split_back():
    stack = StackedModel([_model("bn", seed) for seed in SEEDS])
    optimizer = build_optimizer(stack.params.values(), 0.01)
    stack(torch.randn(3, 4, 3, 32, 32, dtype=torch.float64)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    parts = [split_optimizer_state(state, s) for s in range(3)]
    again = stack_optimizer_states(parts)
    for i, st in state["state"].items():
        for k, v in st.items():
            assert torch.equal(again["state"][i][k], v)


def _task(index, norm, seed, done=0):
    state = {"epochs_done": done} if done else None
    return Task(index, norm, seed, checkpoint_path(Path("x"), norm, seed), state)


def test_which_runs_stack():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    tasks = [_task(0, "bn", 0), _task(1, "bn", 1), _task(2, "none", 0), _task(3, "ghost", 0),
             _task(4, "ghost", 1), _task(5, "none", 1, done=1), _task(6, "bn", 2)]  # fmt: skip
    together, alone = groups(config(Path("x"), stack=True), tasks, cpu)
    assert [[t.index for t in g] for g in together] == [[0, 1, 6]]
    assert [t.index for t in alone] == [2, 3, 4, 5]  # one none per epochs done; ghost alone
    assert groups(config(Path("x")), tasks, cpu) == ([], tasks)  # unset: only on CUDA
    assert groups(config(Path("x")), tasks, cuda)[0] == together
    assert groups(config(Path("x"), stack=True, amp="bf16"), tasks, cpu) == ([], tasks)


def test_stacked_comparison_resumes_and_saves_runs_as_alone(tmp_path, monkeypatch):
    cfg = config(tmp_path, stack=True, seeds=(0, 1))
    straight = run_compare(
        dataclasses.replace(cfg, out=str(tmp_path / "straight")), data=tiny_cifar(), log=quiet
    )
    resumed = interrupted_then_resumed(tmp_path, cfg, monkeypatch, 3, "after epoch")
    assert numbers(resumed) == numbers(straight)
    run_compare(
        dataclasses.replace(cfg, stack=False, out=str(tmp_path / "alone")),
        data=tiny_cifar(),
        log=quiet,
    )
    for run in ("bn", "none"):
        ours = load_checkpoint(checkpoint_path(tmp_path / "straight", run, 1))
        theirs = load_checkpoint(checkpoint_path(tmp_path / "alone", run, 1))
        assert ours.keys() == theirs.keys()
        assert {k: v.shape for k, v in ours["model"].items()} == {
            k: v.shape for k, v in theirs["model"].items()
        }
        assert ours["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]


def test_stacked_runs_on_the_triton_kernels_follow_the_runs_alone(monkeypatch, bnlab_kernels_only):
    """What a GPU runs: the stacked model's batch norms reach the Triton kernels (the seeds
    folded into the channels by the vmap rule); on the GPU, or else under Triton's
    interpreter on the CPU."""
    pytest.importorskip("triton")
    from bnlab import kernels
    from bnlab.kernels import gpu

    from .test_triton import DEVICE, TRI

    monkeypatch.setattr(kernels, "_FAST", (TRI,))
    calls = count_calls(monkeypatch, gpu, "eager_forward_train")
    data = tiny_cifar(n_train=8, n_test=4)
    loader = DeviceLoader(data.train_images, data.train_labels, batch_size=4, seed=0, device=DEVICE)
    alone = [_model("bn", seed).to(DEVICE) for seed in SEEDS]
    steps = [eager_step(m, build_optimizer(m, 0.01)) for m in alone]
    stack = StackedModel([_model("bn", seed).to(DEVICE) for seed in SEEDS])
    step = stacked_step(stack, build_optimizer(stack.params.values(), 0.01))
    for x, y in loader.stacked_batches(SEEDS, epoch=0):
        losses = step(x.double(), y)
        for s in range(len(SEEDS)):
            torch.testing.assert_close(losses[s], steps[s](x[s].double(), y[s]), atol=1e-12, rtol=0)
    for s, m in enumerate(alone):
        for k, v in m.state_dict().items():
            tol = 1e-6 if _noise_driven(k) else 1e-12
            torch.testing.assert_close(stack.state_dict(s)[k], v, atol=tol, rtol=0, msg=k)
    shapes = [tuple(args[0].shape) for args in calls]
    assert (4, 3 * 6, 28, 28) in shapes  # conv1's norm, the three seeds side by side
