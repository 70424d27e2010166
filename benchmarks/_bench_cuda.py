"""bench_bn.py --device cuda: bnlab's Triton batch norm against torch's (cuDNN) on a GPU.

Every contender's step (training forward, forward+backward, eval) is captured
once in a CUDA graph and timed by replaying it between CUDA events, torch and
bnlab alternating round by round; a time is the median over rounds. Graph
replay is how the experiment runs its steps, and it takes the launch cost of
Python out of both sides alike, which LeNet's tiny shapes would otherwise be
all about. GB/s counts the ideal traffic: x read and y written for a forward
(2S), plus dy read and dx written for a backward (4S in all); the device's
copy bandwidth (a large tensor copied into another, read + write) is
measured in the same run.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

import bnlab.nn
from bnlab import kernels


@dataclass(frozen=True)
class GpuCase:
    shape: tuple[int, ...]
    channels_last: bool = False
    large: bool = True  # the shapes the 1.5x and 70%-of-copy checks are about

    @property
    def label(self) -> str:
        return "×".join(map(str, self.shape)) + (" CL" if self.channels_last else "")


CASES = [
    GpuCase((64, 6, 28, 28), large=False),  # LeNet-5 conv1
    GpuCase((64, 16, 10, 10), large=False),  # LeNet-5 conv2
    GpuCase((64, 120), large=False),  # LeNet-5 fc1
    GpuCase((64, 84), large=False),  # LeNet-5 fc2
    GpuCase((64, 64, 56, 56)),
    GpuCase((64, 64, 56, 56), channels_last=True),
    GpuCase((128, 256, 14, 14)),
    GpuCase((32, 128, 28, 28)),
    GpuCase((8192, 1024)),
    GpuCase((8, 32, 16, 32, 32)),
]
DTYPES = (torch.float32, torch.bfloat16)
MODES = ("train", "fwd+bwd", "eval")
BYTES_PER_PASS = {"train": 2, "fwd+bwd": 4, "eval": 2}  # multiples of S


def graphed(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` captured in a CUDA graph (after warm-up runs on a side stream); its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def timed(fns: dict[str, Callable[[], None]], rounds: int, calls: int = 20) -> dict[str, float]:
    """Median seconds per call of each function, rounds alternating between them."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for r in range(rounds):
        names = list(fns)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start.record()
            for _ in range(calls):
                fns[name]()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) / 1e3 / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


def copy_bandwidth(rounds: int) -> float:
    src = torch.ones(256 << 20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    seconds = timed({"copy": lambda: dst.copy_(src)}, rounds, calls=5)["copy"]
    return 2 * src.nbytes / seconds / 1e9


def _modules(case: GpuCase):
    cls = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(case.shape)]
    c = case.shape[1]
    return getattr(torch.nn, cls)(c).cuda(), getattr(bnlab.nn, cls)(c).cuda()


def _step(m: torch.nn.Module, mode: str, x: torch.Tensor, dy: torch.Tensor):
    m.train(mode != "eval")
    params = list(m.parameters())
    if mode == "eval":
        return lambda: m(x.detach())
    if mode == "train":
        return lambda: m(x)
    return lambda: torch.autograd.grad(m(x), [x, *params], dy)


def measure(case: GpuCase, dtype: torch.dtype, rounds: int) -> dict[str, dict[str, float]]:
    """{mode: {"torch": s, "bnlab": s}} for one case and dtype."""
    theirs, ours = _modules(case)
    x = torch.randn(case.shape, device="cuda", dtype=dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    dy = torch.randn_like(x)
    out = {}
    for mode in MODES:
        with torch.no_grad() if mode == "eval" else torch.enable_grad():
            fns = {
                "torch": graphed(_step(theirs, mode, x, dy)),
                "bnlab": graphed(_step(ours, mode, x, dy)),
            }
        out[mode] = timed(fns, rounds)
    return out


def report(rows: list[tuple[GpuCase, torch.dtype, dict]], copy_gbs: float) -> str:
    lines = [
        "| shape | dtype | mode | torch µs | bnlab µs | speedup | bnlab GB/s | of copy |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    slower, fwd_bwd, eval_copy = [], [], []
    for case, dtype, times in rows:
        nbytes = torch.Size(case.shape).numel() * dtype.itemsize
        for mode in MODES:
            t, b = times[mode]["torch"], times[mode]["bnlab"]
            gbs = BYTES_PER_PASS[mode] * nbytes / b / 1e9
            name = str(dtype).removeprefix("torch.")
            lines.append(
                f"| {case.label} | {name} | {mode} | {t * 1e6:.1f} | {b * 1e6:.1f} | "
                f"{t / b:.2f} | {gbs:.0f} | {gbs / copy_gbs:.0%} |"
            )
            where = f"{case.label} {name} {mode}"
            if t / b < 1.0:
                slower.append(f"{where} ({t / b:.2f}×)")
            if case.large and not case.channels_last and mode == "fwd+bwd":
                fwd_bwd.append((t / b >= 1.5, f"{where} {t / b:.2f}×"))
            if case.shape in ((64, 64, 56, 56), (8192, 1024)) and mode == "eval":
                eval_copy.append((gbs / copy_gbs >= 0.7, f"{where} {gbs / copy_gbs:.0%}"))
    lines += [
        "",
        f"Copy bandwidth: {copy_gbs:.0f} GB/s. Slower than torch: {', '.join(slower) or 'none'}.",
        "fwd+bwd ≥ 1.5× torch (large, contiguous): "
        + ", ".join(f"{'✓' if ok else '✗'} {t}" for ok, t in fwd_bwd),
        "eval ≥ 70% of copy: " + ", ".join(f"{'✓' if ok else '✗'} {t}" for ok, t in eval_copy),
    ]
    return "\n".join(lines)


def device_summary() -> str:
    import triton

    props = torch.cuda.get_device_properties(0)
    return (
        f"{props.name} ({props.multi_processor_count} SMs); torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, triton {triton.__version__}"
    )


def run(rounds: int) -> str:
    """The whole table, as markdown."""
    if not torch.cuda.is_available():
        raise SystemExit("bench_bn.py --device cuda: no CUDA device is visible to torch")
    backend = kernels.select(torch.randn(2, 2, device="cuda")).name
    if backend != "triton":
        raise SystemExit(
            f"bench_bn.py --device cuda: CUDA tensors run the {backend} backend; "
            'install the triton extra (pip install -e ".[triton]")'
        )
    copy_gbs = copy_bandwidth(rounds)
    rows = []
    for case in CASES:
        for dtype in DTYPES:
            rows.append((case, dtype, measure(case, dtype, rounds)))
            print(f"  measured {case.label} {dtype}", flush=True)
    return f"Device: {device_summary()}\n\n" + report(rows, copy_gbs)
