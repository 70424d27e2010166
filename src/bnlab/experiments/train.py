"""Train and evaluate one LeNet-5: the loops of the original script, made fast and resumable.

`train_run` yields after every epoch: the epoch's numbers and the state to
checkpoint. It writes nothing; the caller decides what to keep.

Speed, with the method unchanged (Adam, cross-entropy, batch 64, same data order):
- the whole split sits on the device as one tensor (`bnlab.data.DeviceLoader`),
  so there are no worker processes and no per-image Python;
- the epoch's loss is summed as a tensor: no `.item()` sync per batch;
- evaluation runs under `torch.inference_mode` with a large batch;
- Adam uses the fused kernel (one op for all parameters) where torch has it;
- on the CPU, ReLU + max-pooling run as one fused native pass (exact), and
  the narrow convolution parts on bnlab's direct kernels;
- on CUDA the training step is captured once and replayed as a CUDA graph.

Precision (`cfg.amp`): "off" runs everything in float32; "bf16" and "fp16" run
the model's forward, in training and in evaluation, under CPU autocast
(`amp_context`), so the convolutions, the linear layers and the norm layers
after them compute in that dtype while the parameters, the loss and Adam stay
float32.

Determinism: the seed fixes the initial weights (torch is seeded right before the
model is built, and norm layers draw no random numbers, so "bn", "torch-bn" and
"none" start from the same conv/linear weights) and the data order (a function
of seed and epoch). Same seed and device give the same numbers on the CPU, also
across a resume: the checkpoint holds the model, Adam, the RNG and the loader's
next epoch.

"frozen" trains as batch norm for its first epochs (FREEZE_AFTER_EPOCHS), then
`freeze_norms` turns its layers into FrozenBatchNorm at the epoch boundary: from
then on their statistics and affine stay fixed and Adam steps the rest. A
checkpoint saved after that boundary holds the frozen model, which a resume
rebuilds the same way before loading it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bnlab.data import CIFAR10, DeviceLoader
from bnlab.experiments.config import AMP_DTYPES, Config
from bnlab.models import LeNet5
from bnlab.models.fused import fuse_relu_maxpool
from bnlab.models.lenet import FREEZE_AFTER_EPOCHS
from bnlab.models.native_conv import use_native_conv
from bnlab.nn import freeze

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Makes the context the model's forward runs in (a fresh one per use, as autocast's is).
Precision = Callable[[], contextlib.AbstractContextManager[object]]


class Bar(Protocol):
    """What the training loop needs of a progress bar (tqdm has it)."""

    disable: bool

    def update(self, n: int = 1) -> object: ...
    def set_postfix(self, **values: Any) -> None: ...
    def close(self) -> None: ...


MakeBar = Callable[[int, str], Bar]  # (batches in the epoch, description) -> a bar


def terminal_bar(total: int, desc: str) -> Bar:
    """A tqdm bar on stderr, shown only when stderr is a terminal."""
    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=None, dynamic_ncols=True)


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    train_loss: float  # mean cross-entropy over the epoch's training images
    test_acc: float  # percent of the test set
    train_seconds: float
    eval_seconds: float
    seconds: float  # the whole epoch, training and evaluation, end to end


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def amp_context(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """The context the model's forward runs in: CPU autocast at `cfg.amp`'s dtype, or nothing.

    Only the forward goes in it: autocast leaves the parameters float32 and
    casts copies per operation, and the loss is taken in float32 outside it.
    Autocast is for the CPU only here (the experiment's CUDA step is a captured
    graph), so another device is refused rather than silently run in float32.
    """
    if cfg.amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {cfg.amp!r}")
    dtype = AMP_DTYPES[cfg.amp]
    if dtype is None:
        return contextlib.nullcontext()
    if device.type != "cpu":
        raise ValueError(
            f"amp {cfg.amp!r} runs the forward under CPU autocast, but this run trains on "
            f"{device}: train on the CPU, or leave amp off"
        )
    return torch.autocast("cpu", dtype=dtype)


def memory_formats(
    cfg: Config, norm: str, device: torch.device
) -> tuple[torch.memory_format, torch.memory_format]:
    """(the model's weights, the images): `cfg.channels_last` for both, or where unset,
    the layouts measured fastest for LeNet-5.

    CPU (1 thread, batch 64, interleaved): NCHW images and channels_last weights.
    conv1 runs on bnlab's direct kernels, which read NCHW rows and, by torch's
    rule, write channels_last when the weight is; everything after it then runs
    channels_last, where bnlab's pooling is fastest; this mix was the fastest
    step of the three (all NCHW, all channels_last, this) with and without BN
    (`bnlab train` with `--channels-last`, `--no-channels-last` or neither
    times each). torch's own CPU batch norm trains slower on channels_last, so
    "torch-bn" keeps NCHW.
    On CUDA (graph replay) NHWC was no faster for any norm and slower for
    "none", so CUDA keeps NCHW.
    """
    if cfg.channels_last is not None:
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        return fmt, fmt
    if device.type == "cpu" and norm != "torch-bn":
        return torch.channels_last, torch.contiguous_format
    return torch.contiguous_format, torch.contiguous_format


def build_model(
    norm: str,
    seed: int,
    device: torch.device,
    fmt: torch.memory_format,
    *,
    renorm_warmup: int = 0,
) -> nn.Module:
    """LeNet-5 with weights fixed by `seed` alone (whatever the norm).

    `renorm_warmup`: the training steps over which renorm's limits open (one epoch's in a run).

    On the CPU each ReLU + MaxPool2d(2) pair runs as one fused native pass
    (`fuse_relu_maxpool`): the same numbers, bit for bit, in less time per
    step, where torch's pooling is a large share (`benchmarks/bench_pool.py`).
    And the narrow parts of the convolutions (conv1 whole, conv2's input
    gradient) run on bnlab's direct kernels (`use_native_conv`), faster than
    torch's there (`benchmarks/bench_conv.py`); the numbers differ from
    torch's only by the order of float additions.
    """
    torch.manual_seed(seed)
    model = LeNet5(norm, renorm_warmup=renorm_warmup).to(device=device, memory_format=fmt)
    return use_native_conv(fuse_relu_maxpool(model)) if device.type == "cpu" else model


def build_optimizer(
    model: nn.Module | Iterable[torch.Tensor], lr: float, *, capturable: bool = False
) -> torch.optim.Adam:
    """Adam as in the script, over a model's parameters (or given tensors); fused (one
    kernel for all parameters) where torch supports it."""
    params = list(model.parameters() if isinstance(model, nn.Module) else model)
    kwargs: dict[str, Any] = {"lr": lr, "capturable": True} if capturable else {"lr": lr}
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except RuntimeError:  # fused Adam is missing for this device in this torch
        return torch.optim.Adam(params, foreach=True, **kwargs)


def freeze_norms(
    model: nn.Module, optimizer: torch.optim.Optimizer, lr: float, *, capturable: bool = False
) -> torch.optim.Adam:
    """Freeze the model's batch norms in place; return Adam over the parameters left.

    Frozen layers hold no parameters, so Adam is rebuilt over the rest, each
    keeping its state (moments, step count): the same optimizer a resume loads
    from a checkpoint saved after the switch.
    """
    freeze(model)
    frozen = build_optimizer(model, lr, capturable=capturable)
    for group in frozen.param_groups:
        for p in group["params"]:
            if p in optimizer.state:
                frozen.state[p] = optimizer.state[p]
    return frozen


def restore_model(
    checkpoint: dict[str, Any],
    device: torch.device,
    fmt: torch.memory_format,
    *,
    renorm_warmup: int = 0,
) -> nn.Module:
    """The model of a checkpoint `train_run` yielded, built as training built it.

    A "frozen" run saved after its switch holds FrozenBatchNorm layers, so its
    model is frozen before the weights load. `renorm_warmup` matters only to a
    renorm model put back in training mode.
    """
    norm = checkpoint["norm"]
    model = build_model(norm, checkpoint["seed"], device, fmt, renorm_warmup=renorm_warmup)
    freeze_at = FREEZE_AFTER_EPOCHS.get(norm)
    if freeze_at is not None and checkpoint["epochs_done"] > freeze_at:
        freeze(model)
    model.load_state_dict(checkpoint["model"])
    return model


def eager_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    precision: Precision = contextlib.nullcontext,
) -> Step:
    """The plain training step; returns the batch's mean loss, detached (no sync).

    The forward runs in `precision()` (see `amp_context`); the loss is float32 or wider,
    whatever it gives.
    """

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with precision():
            logits = model(x)
        if logits.dtype.itemsize < 4:  # a 16-bit forward's loss is still taken in float32
            logits = logits.float()
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


class CUDAGraphStep:
    """A training step (such as `eager_step`'s) captured once as a CUDA graph, then replayed
    for every full batch.

    One replay launches the whole forward, backward and Adam update, which for a
    network as small as LeNet-5 is dominated by launch overhead otherwise (on an
    H200, an epoch of batch 64 took 4.2 s eager and 0.5 s replayed, with bn). The
    first `warmup` batches run eagerly on a side stream (as torch's recipe asks:
    lazy initialization must happen before capture); they are ordinary training
    steps. Batches of another shape (the last, partial one) run eagerly. If the
    capture fails, the step stays eager for good, with a warning. The step sets
    the gradients to None before its backward, so they are allocated from the
    graph's pool.
    """

    def __init__(self, step: Step, warmup: int = 3) -> None:
        self.eager, self.warmup = step, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.warm = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.graph is not None and x.shape == self.x.shape:
            self.x.copy_(x)
            self.y.copy_(y)
            self.graph.replay()
            return self.loss.clone()  # the next replay overwrites self.loss
        if self.graph is not None or self.failed:
            return self.eager(x, y)
        if self.warm < self.warmup:
            self.warm += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.eager(x, y)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        return self._capture(x, y)

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.x, self.y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                loss = self.eager(self.x, self.y)
        except RuntimeError as e:
            # Capture records without running, so the model has not moved: train eagerly.
            warnings.warn(f"CUDA graph capture failed, training eagerly: {e}", stacklevel=2)
            self.failed = True
            torch.cuda.synchronize()
            return self.eager(x, y)
        self.graph, self.loss = graph, loss
        graph.replay()
        return self.loss.clone()


def train_epoch(
    step: Step, model: nn.Module, loader: DeviceLoader, desc: str, make_bar: MakeBar = terminal_bar
) -> float:
    """One pass over `loader`; the mean loss per image."""
    model.train()
    total = torch.zeros((), device=loader.device)  # summed on the device: no sync per batch
    seen = 0
    bar = make_bar(len(loader), desc)
    try:
        for i, (x, y) in enumerate(loader, 1):
            total += step(x, y) * len(y)
            seen += len(y)
            bar.update(1)
            if i % 100 == 0 and not bar.disable:  # a sync, but only every 100 batches
                bar.set_postfix(loss=f"{total.item() / seen:.3f}")
    finally:
        bar.close()
    return total.item() / seen


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader: DeviceLoader, precision: Precision = contextlib.nullcontext
) -> float:
    """Accuracy on `loader`, in percent; the forward runs in `precision()`, as in training."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=loader.device)
    seen = 0
    with precision():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum()
            seen += len(y)
    return 100.0 * correct.item() / seen


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_test_loader(
    data: CIFAR10, cfg: Config, device: torch.device, fmt: torch.memory_format
) -> DeviceLoader:
    """The test split in evaluation batches, in order."""
    return DeviceLoader(
        data.test_images,
        data.test_labels,
        batch_size=cfg.eval_batch_size,
        shuffle=False,
        device=device,
        memory_format=fmt,
        drop_single=False,  # eval uses running statistics: a batch of one is fine
    )


def checkpoint_state(
    norm: str,
    seed: int,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    history: list[dict[str, float]],
    device: torch.device,
) -> dict[str, Any]:
    """What a run saves after an epoch (its history's length is the epochs done): enough to
    resume it, by `train_run` or trained stacked (`bnlab.experiments.stacked`)."""
    done = len(history)
    return {
        "norm": norm,
        "seed": seed,
        "epochs_done": done,
        "model": model,
        "optimizer": optimizer,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "loader_epoch": done,  # the order of the next epoch is a function of (seed, this)
        "history": list(history),
    }


def train_run(
    cfg: Config,
    norm: str,
    seed: int,
    data: CIFAR10,
    *,
    checkpoint: dict[str, Any] | None = None,
    make_bar: MakeBar = terminal_bar,
) -> Iterator[tuple[EpochResult, dict[str, Any]]]:
    """Train LeNet-5 with `norm` for `cfg.epochs` epochs; yield (result, checkpoint state) per epoch.

    With `checkpoint` (a state this generator yielded before), continue after its
    epoch. The yielded state references live tensors: save it before resuming
    the generator. `make_bar` makes each epoch's progress bar.
    """
    device = resolve_device(cfg.device)
    amp_context(cfg, device)  # refuses a setting it cannot run before anything is built
    precision = functools.partial(amp_context, cfg, device)
    model_fmt, data_fmt = memory_formats(cfg, norm, device)
    n_train = len(data.train_images) if cfg.limit_train is None else cfg.limit_train
    train = data.train_images[:n_train], data.train_labels[:n_train]
    train_loader = DeviceLoader(
        *train, batch_size=cfg.batch_size, seed=seed, device=device, memory_format=data_fmt
    )
    test_loader = make_test_loader(data, cfg, device, data_fmt)
    model = build_model(norm, seed, device, model_fmt, renorm_warmup=len(train_loader))
    use_graph = cfg.cuda_graph and device.type == "cuda"
    optimizer = build_optimizer(model, cfg.lr, capturable=use_graph)
    freeze_at = FREEZE_AFTER_EPOCHS.get(norm)  # the first epoch trained frozen (0-based)
    history: list[dict[str, float]] = []
    if checkpoint is not None:
        if freeze_at is not None and checkpoint["epochs_done"] > freeze_at:
            optimizer = freeze_norms(model, optimizer, cfg.lr, capturable=use_graph)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
        if device.type == "cuda" and checkpoint.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
        history = list(checkpoint["history"])[: checkpoint["epochs_done"]]
    step = eager_step(model, optimizer, precision)
    step = CUDAGraphStep(step) if use_graph else step

    for epoch in range(len(history), cfg.epochs):  # 0-based here, 1-based in the results
        t0 = time.perf_counter()
        if epoch == freeze_at:
            optimizer = freeze_norms(model, optimizer, cfg.lr, capturable=use_graph)
            step = eager_step(model, optimizer, precision)
            step = CUDAGraphStep(step) if use_graph else step
        train_loader.set_epoch(epoch)
        desc = f"{norm} seed {seed} epoch {epoch + 1}/{cfg.epochs}"
        train_loss = train_epoch(step, model, train_loader, desc, make_bar)
        _sync(device)
        t1 = time.perf_counter()
        test_acc = evaluate(model, test_loader, precision)
        t2 = time.perf_counter()
        result = EpochResult(epoch + 1, train_loss, test_acc, t1 - t0, t2 - t1, t2 - t0)
        history.append(dataclasses.asdict(result))
        state = checkpoint_state(
            norm, seed, model.state_dict(), optimizer.state_dict(), history, device
        )
        yield result, state
