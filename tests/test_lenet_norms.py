"""LeNet-5's other norms: renorm, ghost, frozen, gn build, train, round-trip, and frozen switches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab.experiments.train as train
import bnlab.nn
from bnlab.experiments import Config, train_run
from bnlab.experiments.train import build_model, build_optimizer, eager_step, restore_model
from bnlab.models import LeNet5

from .test_experiment_train import tiny_cifar

NEW_NORMS = ("renorm", "ghost", "frozen", "gn")
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def norm_layers(model: nn.Module) -> list[nn.Module]:
    kinds = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, bnlab.nn.FrozenBatchNorm2d,
             bnlab.nn.FrozenBatchNorm1d)  # fmt: skip
    return [m for m in model.modules() if isinstance(m, kinds)]


def test_each_norm_builds_its_layers():
    renorm = norm_layers(LeNet5("renorm", renorm_warmup=7))
    assert [type(m) for m in renorm] == [bnlab.nn.BatchRenorm2d] * 2 + [bnlab.nn.BatchRenorm1d] * 2
    assert all((m.rmax, m.dmax, m.warmup) == (3.0, 5.0, 7) for m in renorm)
    ghost = norm_layers(LeNet5("ghost"))
    assert [type(m) for m in ghost] == [bnlab.nn.GhostBatchNorm2d] * 2 + [
        bnlab.nn.GhostBatchNorm1d
    ] * 2
    assert all(m.virtual_batch_size == 16 for m in ghost)
    gn = norm_layers(LeNet5("gn"))
    assert [(type(m), m.num_groups, m.num_channels) for m in gn] == [
        (nn.GroupNorm, 2, c) for c in (6, 16, 120, 84)
    ]
    frozen = norm_layers(LeNet5("frozen"))  # batch norm until the training loop freezes it
    assert [type(m) for m in frozen] == [bnlab.nn.BatchNorm2d] * 2 + [bnlab.nn.BatchNorm1d] * 2


@pytest.mark.parametrize("norm", ["bn", "torch-bn", "none"])
def test_renorm_warmup_leaves_the_other_norms_alone(norm):
    torch.manual_seed(0)
    plain = LeNet5(norm)
    torch.manual_seed(0)
    other = LeNet5(norm, renorm_warmup=123)
    assert repr(plain) == repr(other)
    for (k, a), (_, b) in zip(plain.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("norm", NEW_NORMS)
def test_each_norm_trains_a_step(norm):
    model = build_model(norm, 0, CPU, torch.channels_last, renorm_warmup=4)
    before = [p.detach().clone() for p in model.parameters()]
    step = eager_step(model, build_optimizer(model, lr=0.01))
    loss = step(torch.randn(32, 3, 32, 32), torch.arange(32) % 10)  # 2 ghost batches of 16
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_train_run_passes_one_epoch_as_renorm_warmup(monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["renorm_warmup"])
        return build_model(*args, **kwargs)

    monkeypatch.setattr(train, "build_model", spy)
    data = tiny_cifar(n_train=100, n_test=20)
    list(
        train_run(
            Config(device="cpu", epochs=1, batch_size=16, eval_batch_size=20), "renorm", 0, data
        )
    )
    assert seen == [7]  # ceil(100 / 16) steps


@pytest.mark.parametrize("norm", NEW_NORMS)
def test_checkpoint_round_trips(norm):
    data = tiny_cifar(n_train=96, n_test=32)
    cfg = Config(device="cpu", epochs=2, batch_size=16, eval_batch_size=32)
    *_, (result, state) = train_run(cfg, norm, 0, data)
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    restored = restore_model(saved, CPU, torch.channels_last, renorm_warmup=6).eval()
    x = data.test_images.float().div(255).sub(0.5).div(0.5)
    assert restored.state_dict().keys() == state["model"].keys()
    for key, value in restored.state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    accuracy = 100.0 * (restored(x).argmax(1) == data.test_labels).float().mean().item()
    assert accuracy == pytest.approx(result.test_acc)


def test_frozen_switches_at_the_epoch_boundary():
    data = tiny_cifar(n_train=96, n_test=32)
    cfg = Config(device="cpu", epochs=3, batch_size=16, eval_batch_size=32)
    states = [
        {k: v.clone() if torch.is_tensor(v) else v for k, v in s["model"].items()}
        for _, s in train_run(cfg, "frozen", 0, data)
    ]
    first, second, third = states
    assert "conv1.1.num_batches_tracked" in first  # epoch 1 trains batch norm
    assert int(first["conv1.1.num_batches_tracked"]) == 6
    assert "conv1.1.num_batches_tracked" not in second  # frozen from epoch 2 on
    for key in ("conv1.1.running_mean", "fc1.1.running_var", "fc2.1.weight", "conv2.1.bias"):
        assert torch.equal(first[key], second[key]) and torch.equal(second[key], third[key]), key
    assert not torch.equal(first["conv1.0.weight"], second["conv1.0.weight"])  # the rest trains
    assert not torch.equal(second["fc3.weight"], third["fc3.weight"])


@pytest.mark.parametrize("after", [1, 2])  # on the boundary, and after the switch
def test_frozen_resumes_identically(after):
    data = tiny_cifar(n_train=96, n_test=32)
    cfg = Config(device="cpu", epochs=3, batch_size=16, eval_batch_size=32)
    straight = [(r, s["model"]["fc3.weight"].clone()) for r, s in train_run(cfg, "frozen", 0, data)]
    short = Config(device="cpu", epochs=after, batch_size=16, eval_batch_size=32)
    *_, (_, state) = train_run(short, "frozen", 0, data)
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    resumed = [
        (r, s["model"]["fc3.weight"].clone())  # live tensors: copied as they are
        for r, s in train_run(cfg, "frozen", 0, data, checkpoint=state)
    ]
    assert len(resumed) == 3 - after
    for (a, wa), (b, wb) in zip(straight[after:], resumed, strict=True):
        assert (a.epoch, a.train_loss, a.test_acc) == (b.epoch, b.train_loss, b.test_acc)
        assert torch.equal(wa, wb)


def test_frozen_adam_keeps_the_moments_of_what_still_trains():
    model = build_model("frozen", 0, CPU, torch.contiguous_format)
    optimizer = build_optimizer(model, lr=0.01)
    eager_step(model, optimizer)(torch.randn(8, 3, 32, 32), torch.arange(8))
    conv = model.conv1[0].weight
    moment = optimizer.state[conv]["exp_avg"]
    frozen = train.freeze_norms(model, optimizer, 0.01)
    assert sum(len(g["params"]) for g in frozen.param_groups) == 10  # 5 conv/linear layers
    assert frozen.state[conv]["exp_avg"] is moment
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
