"""fold over a zoo of small models: chains, ResNet blocks, every producer kind, every norm.

Each model gets random affine parameters and running statistics, so a fold that
dropped or misplaced any term would show. The folded copy must match the model
in eval mode (float32 tolerance in float32, 1e-12 in float64), keep exactly the
batch norms that cannot fold, warn about each of those by name, and leave the
original model untouched.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import bnlab
import bnlab.nn

pytestmark = pytest.mark.usefixtures("one_thread")


def _stats(module: nn.Module) -> nn.Module:
    """Random γ, β, running statistics; conv/linear weights as initialized."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm | bnlab.nn.FrozenBatchNorm2d):
                for name in ("weight", "bias", "running_mean"):
                    t = getattr(m, name)
                    if t is not None:
                        t.copy_(
                            torch.randn(t.shape, generator=g) * 0.5 + (1 if name == "weight" else 0)
                        )
                if m.running_var is not None:
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module


def conv_bn(cin, cout, k=3, stride=1, norm=nn.BatchNorm2d, bias=False, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, bias=bias, groups=groups), norm(cout)
    )


class BasicBlock(nn.Module):
    """ResNet's basic block: two conv-BN, a shortcut (conv-BN when the shape changes), add, ReLU."""

    def __init__(self, cin, cout, stride=1, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), norm(cout)
        self.downsample = (
            conv_bn(cin, cout, 1, stride, norm) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, norm=nn.BatchNorm2d):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(cin, mid, 1, norm=norm), nn.ReLU(),
            conv_bn(mid, mid, 3, norm=norm, groups=2), nn.ReLU(),
            conv_bn(mid, cin, 1, norm=norm),
        )  # fmt: skip

    def forward(self, x):
        return torch.relu(x + self.body(x))


class PreActBlock(nn.Module):
    """BN → ReLU → conv: the batch norm is fed by the block input, nothing to fold into."""

    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv(torch.relu(self.bn(x)))


def resnet(norm=nn.BatchNorm2d):
    return nn.Sequential(
        conv_bn(3, 8, norm=norm), nn.ReLU(),
        BasicBlock(8, 8, norm=norm), BasicBlock(8, 16, 2, norm=norm), Bottleneck(16, 8, norm=norm),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


def mixed_norms():
    """Every norm fold takes: torch's, bnlab's, renorm, ghost, frozen, no affine, sync."""
    return nn.Sequential(
        conv_bn(3, 4, norm=nn.BatchNorm2d), conv_bn(4, 4, norm=bnlab.nn.BatchNorm2d),
        conv_bn(4, 4, norm=bnlab.nn.BatchRenorm2d), nn.ReLU(),
        conv_bn(4, 4, norm=lambda c: bnlab.nn.GhostBatchNorm2d(c, virtual_batch_size=2), bias=True),
        conv_bn(4, 4, norm=bnlab.nn.FrozenBatchNorm2d),
        conv_bn(4, 4, norm=lambda c: bnlab.nn.BatchNorm2d(c, affine=False)),
        conv_bn(4, 4, norm=nn.SyncBatchNorm),
    )  # fmt: skip


def mlp():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 8, bias=False), bnlab.nn.BatchNorm1d(8),
    )  # fmt: skip


def other_convs():
    """Conv1d/3d and grouped ConvTranspose2d, reshaped between them."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Sequential(
                nn.ConvTranspose2d(3, 6, 2, stride=2, groups=3), nn.BatchNorm2d(6)
            )
            self.c1 = nn.Sequential(nn.Conv1d(6, 4, 3, padding=1), bnlab.nn.BatchNorm1d(4))
            self.c3 = nn.Sequential(nn.Conv3d(4, 2, 1), bnlab.nn.BatchNorm3d(2))
            self.t1 = nn.Sequential(nn.ConvTranspose1d(4, 4, 1), nn.BatchNorm1d(4))

        def forward(self, x):
            y = self.up(x)  # (N, 6, 16, 16)
            z = self.t1(self.c1(y.flatten(2)))  # (N, 4, 256)
            return self.c3(z.view(z.shape[0], 4, 4, 8, 8))

    return Net()


def unfoldable():
    """Pre-activation BN, a conv whose output is used twice, a BN without running statistics."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = PreActBlock(3)
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            self.nostats = conv_bn(
                3, 3, norm=lambda c: nn.BatchNorm2d(c, track_running_stats=False)
            )

        def forward(self, x):
            y = self.conv(self.pre(x))
            return self.nostats(self.bn(y) + y)

    return Net()


def untraceable():
    """Python control flow on data: tracing fails, the parts inside still fold."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(3, 4)
            self.b = conv_bn(4, 4)

        def forward(self, x):
            y = self.a(x)
            return self.b(y) if y.sum() > 0 else y

    return Net()


# name -> (builder, input shape, names of the batch norms that stay)
ZOO = {
    "resnet": (resnet, (2, 3, 8, 8), []),
    "resnet-bnlab": (lambda: resnet(bnlab.nn.BatchNorm2d), (2, 3, 8, 8), []),
    "mixed-norms": (mixed_norms, (2, 3, 8, 8), []),
    "mlp": (mlp, (4, 3, 8, 8), []),
    "other-convs": (other_convs, (2, 3, 8, 8), []),
    "unfoldable": (unfoldable, (2, 3, 8, 8), ["pre.bn", "bn", "nostats.1"]),
    "untraceable": (untraceable, (2, 3, 8, 8), []),
}


def _norm_names(model):
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm | bnlab.nn.FrozenBatchNorm2d)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(ZOO))
def test_fold_matches_the_model(name, dtype):
    build, shape, stays = ZOO[name]
    torch.manual_seed(0)
    model = _stats(build()).to(dtype)
    model.train()
    x = torch.randn(shape, dtype=dtype) + 0.3
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded = bnlab.fold(model)
    messages = [str(w.message) for w in caught]
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not folded.training
    assert sorted(_norm_names(folded)) == sorted(stays)
    for norm in stays:
        assert any(m.startswith(f"fold: {norm} (") for m in messages), (norm, messages)
    if name == "untraceable":
        assert any(re.match(r"fold: cannot trace the model \(Net: TraceError", m) for m in messages)
    model.eval()
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **tol)
        torch.testing.assert_close(folded(-x), model(-x), **tol)


def test_the_warnings_say_why():
    model = _stats(unfoldable())
    with pytest.warns(UserWarning) as caught:
        bnlab.fold(model)
    text = "\n".join(str(w.message) for w in caught)
    assert (
        "fold: pre.bn (BatchNorm2d) stays an eval batch norm: its input comes from placeholder x"
        in text
    )
    assert (
        "fold: bn (BatchNorm2d) stays an eval batch norm: the output of conv is also used by add"
        in text
    )
    assert (
        "fold: nostats.1 (BatchNorm2d) stays an eval batch norm: it has no running statistics"
        in text
    )


def test_shared_conv_and_mismatched_producers_stay():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
            self.lin, self.bn3 = nn.Linear(4, 4), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn1(self.conv(x)) + self.bn2(self.conv(x)) + self.bn3(self.lin(x[..., :4]))

    model = _stats(Shared()).eval()
    with pytest.warns(UserWarning) as caught:
        folded = bnlab.fold(model)
    text = "\n".join(str(w.message) for w in caught)
    assert "conv is called 2 times" in text
    assert "a BatchNorm2d after lin (Linear) is not one fold handles" in text
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(folded(x), model(x))


def test_lone_batch_norm_stays_and_the_copy_is_a_module():
    bn = _stats(nn.BatchNorm1d(3))
    with pytest.warns(UserWarning, match="the model .BatchNorm1d. stays an eval batch norm"):
        folded = bnlab.fold(bn)
    assert folded is not bn and not folded.training
    x = torch.randn(4, 3)
    torch.testing.assert_close(folded(x), bn.eval()(x))
