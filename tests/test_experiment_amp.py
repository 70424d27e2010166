"""--amp: the model's forward under CPU autocast, in training and evaluation; all else float32."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab.cli
import bnlab.cli_study
import bnlab.experiments.ddp_train as ddp_train
import bnlab.experiments.train as train
from bnlab.cli import main
from bnlab.experiments import Config, train_run
from bnlab.experiments.train import amp_context
from bnlab.speedups.relu_maxpool import relu_maxpool2d

from ._cifar_writers import (
    tiny_cifar_dir,
)
from ._cli import error_of
from .test_experiment_train import tiny_cifar

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PER_BATCH = 16  # images per tiny batch file: 80 training images, 16 test images


def record_norm_inputs(monkeypatch, module) -> list[tuple[bool, torch.dtype]]:
    """(training, input dtype) of every batch-norm call of the models `module` builds."""
    seen: list[tuple[bool, torch.dtype]] = []

    def hook(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen.append((layer.training, inputs[0].dtype))

    real = module.build_model

    def build_model(*args, **kwargs) -> nn.Module:
        model = real(*args, **kwargs)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(module, "build_model", build_model)
    return seen


def floats_of(state: dict) -> set[torch.dtype]:
    """The dtypes of the floating tensors in a (possibly nested) state dict."""
    found = set()
    for value in state.values():
        if isinstance(value, dict):
            found |= floats_of(value)
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            found.add(value.dtype)
    return found


# ---- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_every_training_command_takes_amp(amp):
    parser = bnlab.cli.build_parser()
    for argv in (["train", "--device", "cpu"], ["compare", "--device", "cpu"]):
        args = parser.parse_args([*argv, "--amp", amp])
        cfg = bnlab.cli.COMMANDS[argv[0]][2](args)
        bnlab.cli.check_config(cfg, args.command_parser)  # no SystemExit
        assert cfg.amp == amp
    args = parser.parse_args(["study", "lr", "--device", "cpu", "--amp", amp])
    assert bnlab.cli_study.study_of(args, args.study_parser).base.amp == amp


def test_amp_is_off_unless_asked_for():
    args = bnlab.cli.build_parser().parse_args(["train"])
    assert bnlab.cli.COMMANDS["train"][2](args).amp == "off"


def test_a_bad_amp_is_named_with_the_choices(capsys):
    err = error_of(["train", "--amp", "fp8"], capsys)
    assert "argument --amp: invalid choice: 'fp8'" in err
    assert "off" in err and "bf16" in err and "fp16" in err


def test_amp_on_cuda_is_refused_before_anything_runs(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device auto would pick it
    args = bnlab.cli.build_parser().parse_args(["train", "--amp", "bf16"])
    cfg = bnlab.cli.COMMANDS["train"][2](args)
    with pytest.raises(SystemExit):
        bnlab.cli.check_config(cfg, args.command_parser)
    err = capsys.readouterr().err
    assert "--amp bf16: autocast is for the CPU" in err and "add --device cpu" in err


def test_amp_context_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="amp must be one of off, bf16, fp16, got 'int8'"):
        amp_context(Config(amp="int8"), torch.device("cpu"))
    with pytest.raises(ValueError, match="train on the CPU, or leave amp off"):
        amp_context(Config(amp="fp16"), torch.device("cuda"))
    # off is off everywhere: nothing to refuse
    with amp_context(Config(), torch.device("cuda")):
        assert not torch.is_autocast_enabled("cpu")


# ---- training and evaluation -----------------------------------------------------------------


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_batch_norm_sees_the_amp_dtype_and_the_rest_stays_float32(amp, monkeypatch):
    seen = record_norm_inputs(monkeypatch, train)
    cfg = Config(device="cpu", epochs=1, eval_batch_size=32, amp=amp)
    [(result, state)] = train_run(cfg, "bn", 0, tiny_cifar(n_train=128, n_test=32))
    assert math.isfinite(result.train_loss) and 0 <= result.test_acc <= 100
    # 2 training batches and 1 test batch through 4 batch norms
    assert sorted(set(seen)) == sorted({(True, DTYPES[amp]), (False, DTYPES[amp])})
    assert len(seen) == 4 * 3
    assert floats_of(state["model"]) == {torch.float32}  # parameters and running statistics
    assert floats_of(state["optimizer"]["state"]) == {torch.float32}  # Adam's moments


def test_bf16_training_learns():
    cfg = Config(device="cpu", epochs=3, eval_batch_size=64, amp="bf16")
    losses = [r.train_loss for r, _ in train_run(cfg, "bn", 0, tiny_cifar())]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] * 0.8, losses


def test_data_parallel_training_runs_the_forward_under_amp(monkeypatch):
    import torch.distributed as dist

    seen = record_norm_inputs(monkeypatch, ddp_train)
    cfg = Config(device="cpu", epochs=1, eval_batch_size=32, amp="bf16")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        [(result, state)] = ddp_train.ddp_epochs(
            cfg, "bn", 0, tiny_cifar(n_train=128, n_test=32), torch.device("cpu")
        )
    finally:
        dist.destroy_process_group()
    assert math.isfinite(result.train_loss)
    assert sorted(set(seen)) == [(False, torch.bfloat16), (True, torch.bfloat16)]
    assert floats_of(state["model"]) == {torch.float32}


def test_the_eval_mode_study_evaluates_in_the_training_precision(monkeypatch):
    from bnlab.experiments.studies.eval_mode import MODES, evaluate_modes

    cfg = Config(device="cpu", epochs=1, eval_batch_size=32, amp="bf16")
    data = tiny_cifar(n_train=64, n_test=32)
    [(_, state)] = train_run(cfg, "bn", 0, data)
    seen = record_norm_inputs(monkeypatch, train)
    rows = evaluate_modes(state, cfg, data, (32,), precise_batches=1)
    assert len(rows) == len(MODES)
    assert seen and {dtype for _, dtype in seen} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_relu_maxpool_under_autocast_is_torchs(dtype):
    """bfloat16 (what autocast's layers hand on) takes torch's ops; float32 stays float32."""
    x = torch.randn(4, 6, 10, 10).to(dtype).contiguous(memory_format=torch.channels_last)
    x_ours, x_torch = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = relu_maxpool2d(x_ours)
        theirs = F.max_pool2d(F.relu(x_torch), 2)
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    dy = torch.randn_like(ours)
    ours.backward(dy)
    theirs.backward(dy)
    torch.testing.assert_close(x_ours.grad, x_torch.grad, rtol=0, atol=0)


# ---- the results folder ----------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    return tiny_cifar_dir(tmp_path, monkeypatch, PER_BATCH, learnable=True)


def test_amp_is_recorded_reported_and_kept_by_resume(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["train", "--epochs", "1", "--device", "cpu", "--data-dir", str(data_dir)]
    argv += ["--out", str(out)]
    assert main([*argv, "--amp", "bf16"]) == 0
    assert "the forward under CPU autocast to bfloat16" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["config"]["amp"] == "bf16"
    report = (out / "report.md").read_text()
    assert "the forward under CPU autocast to bfloat16 (--amp bf16" in report
    assert "| amp | `'bf16'` |" in report

    err = error_of([*argv, "--resume", "--amp", "fp16"], capsys)
    assert "the settings differ" in err and "amp: 'bf16' -> 'fp16'" in err
    err = error_of([*argv, "--resume"], capsys)  # off, by default
    assert "amp: 'bf16' -> 'off'" in err
    assert main([*argv, "--resume", "--amp", "bf16"]) == 0  # the same: nothing left to do


def test_a_float32_report_says_so(data_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["train", "--norm", "none", "--epochs", "1", "--device", "cpu"]
    assert main([*argv, "--data-dir", str(data_dir), "--out", str(out)]) == 0
    assert "float32 throughout" in (out / "report.md").read_text()
