"""The BN experiment: LeNet-5 with and without batch norm on CIFAR-10, compared and reported."""

from bnlab.experiments.compare import ExperimentError, check_out, default_out, run_compare
from bnlab.experiments.config import Config
from bnlab.experiments.train import EpochResult, evaluate, train_epoch, train_run

__all__ = [
    "Config",
    "EpochResult",
    "ExperimentError",
    "check_out",
    "default_out",
    "evaluate",
    "run_compare",
    "train_epoch",
    "train_run",
]
