"""The experiment's own CPU kernels: direct convolution and fused ReLU + 2x2 max pooling.

Why they exist: LeNet-5's layers are narrow (3 -> 6 -> 16 channels, 5x5
kernels, 32x32 images), and torch's CPU convolution and pooling kernels
vectorize along the channels, which such layers leave mostly empty. These
kernels vectorize along image rows instead; ``benchmarks/bench_conv.py`` and
``benchmarks/bench_pool.py`` measure them against torch's, part by part.

Where the boundary is: the library (``bnlab.nn``, ``bnlab.functional``,
``bnlab.kernels``) is batch norm only and never imports this package. Only the
experiment's side uses it: ``bnlab.models`` (``NativeConv2d``,
``ReLUMaxPool2d``) and ``bnlab.experiments``, which swap it in on the CPU.

- :mod:`.conv2d`: ``conv2d``, ``F.conv2d``'s numbers for stride 1 (``conv2d.cpp``).
- :mod:`.relu_maxpool`: ``relu_maxpool2d``, bit-identical to ``max_pool2d(relu(x), 2)``
  (``relu_maxpool.cpp``).
- :mod:`._ext`: the extension ``_bnlab_speedups`` (both sources and ``module.cpp``,
  built by :mod:`bnlab.native`), and the only code that hands it data pointers, each
  checked against the tensor it comes from.
"""

from ._ext import available

__all__ = ["available"]
