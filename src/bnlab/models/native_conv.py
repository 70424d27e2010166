"""``nn.Conv2d`` on bnlab's direct CPU convolution kernels (`bnlab.speedups.conv2d`)."""

from __future__ import annotations

from torch import Tensor, nn

from bnlab.speedups.conv2d import conv2d


class NativeConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (stride 1, no dilation, one group, zero padding) computed by
    `bnlab.speedups.conv2d.conv2d`: the same parameters and state_dict, the same
    function up to the order of float additions."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return conv2d(input, weight, bias, self.padding)


def _supported(m: nn.Module) -> bool:
    return (
        type(m) is nn.Conv2d
        and m.stride == (1, 1)
        and m.dilation == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
        and isinstance(m.padding, tuple)  # not the string forms "same" / "valid"
    )


def use_native_conv(model: nn.Module) -> nn.Module:
    """Turn every supported ``nn.Conv2d`` of ``model`` into a :class:`NativeConv2d`, in place.

    The layers keep their parameter objects (an optimizer built before still
    holds them), names and state_dict keys. Returns ``model``.
    """
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if _supported(child):
                native = NativeConv2d.__new__(NativeConv2d)
                native.__dict__.update(child.__dict__)  # same parameters, buffers and hooks
                parent._modules[name] = native
    return model
