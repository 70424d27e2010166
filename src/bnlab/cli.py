"""The `bnlab` command. Thin: parse, check, hand a Config to the library.

    bnlab train   --norm bn              one model
    bnlab compare --norms bn none        every norm x every seed

Options shared by the subcommands come from the fields of
`bnlab.experiments.Config` (default and help text); a subcommand offers only
those that mean something for it, and adds itself to COMMANDS.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from bnlab.experiments.config import AMP_DTYPES, Config
from bnlab.models import NORMS

NORM_CHOICES = tuple(NORMS)
_DEFAULTS = Config()
_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


# argparse settings of the shared Config fields; default and help come from Config.
OPTIONS: dict[str, dict[str, Any]] = {
    "epochs": {"type": int_at_least(1), "metavar": "N"},
    "lr": {"type": positive_float},
    "batch_size": {"type": int_at_least(1), "metavar": "B"},
    "device": {"choices": ("auto", "cpu", "cuda")},
    "data_dir": {"metavar": "DIR"},
    "download": {"action": "store_true"},
    # at least 2: a batch of one image is dropped (batch norm cannot train on it)
    "limit_train": {"type": int_at_least(2), "metavar": "N"},
    "out": {"metavar": "DIR"},
    "resume": {"action": "store_true"},
    "jobs": {"type": int_at_least(0), "metavar": "J"},
    "threads": {"type": int_at_least(0), "metavar": "T"},
    "channels_last": {"action": argparse.BooleanOptionalAction},
    "eval_batch_size": {"type": int_at_least(1), "metavar": "B"},
    "cuda_graph": {"action": argparse.BooleanOptionalAction},
    "stack": {"action": argparse.BooleanOptionalAction},
    "amp": {"choices": tuple(AMP_DTYPES)},
}


def add_config_options(
    parser: argparse.ArgumentParser,
    leave_out: tuple[str, ...] = (),
    helps: dict[str, str] | None = None,
) -> None:
    """The Config options but `leave_out`; `helps` replaces a field's help for this command."""
    for name, kwargs in OPTIONS.items():
        if name in leave_out:
            continue
        field = _FIELDS[name]
        parser.add_argument(
            "--" + name.replace("_", "-"),
            default=field.default,
            help=(helps or {}).get(name, field.metadata["help"]),
            **kwargs,
        )


def config_from_args(args: argparse.Namespace, **fields: Any) -> Config:
    """The Config of the parsed options; an option a command does not offer keeps its default."""
    given = {name: getattr(args, name) for name in OPTIONS if hasattr(args, name)}
    return Config(**given, **fields)


def _add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--norm", default="bn", choices=NORM_CHOICES, help="normalization layer")
    parser.add_argument(
        "--seed", type=int_at_least(0), default=0, help=_FIELDS["seeds"].metadata["help"]
    )
    # One run: nothing to train at once or stacked, and it gets every thread.
    add_config_options(
        parser, leave_out=("jobs", "stack"), helps={"threads": "torch threads (0: all of torch's)"}
    )
    parser.add_argument(
        "--nproc",
        type=int_at_least(1),
        metavar="N",
        help="train one model data-parallel in N processes on this machine (runs torchrun)",
    )


def add_norms_option(parser: argparse.ArgumentParser, norms: Sequence[str]) -> None:
    """--norms NORM [NORM ...], defaulting to ``norms``."""
    parser.add_argument(
        "--norms",
        nargs="+",
        default=list(norms),
        choices=NORM_CHOICES,
        metavar="NORM",
        help=f"{_FIELDS['norms'].metadata['help']}: {', '.join(NORM_CHOICES)}",
    )


def add_seeds_option(parser: argparse.ArgumentParser, seeds: int, where: str) -> None:
    """--seeds K: seeds 0..K-1 ``where`` (for every norm, in every cell)."""
    parser.add_argument(
        "--seeds",
        type=int_at_least(1),
        default=seeds,
        metavar="K",
        help=f"run seeds 0..K-1 {where}",
    )


def _add_compare(parser: argparse.ArgumentParser) -> None:
    add_norms_option(parser, _DEFAULTS.norms)
    add_seeds_option(parser, len(_DEFAULTS.seeds), "for every norm")
    add_config_options(parser)


# name -> (help, adds the arguments, turns them into a Config)
COMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[..., Config]]
] = {
    "train": (
        "train LeNet-5 with one normalization layer",
        _add_train,
        lambda a: config_from_args(a, norms=(a.norm,), seeds=(a.seed,)),
    ),
    "compare": (
        "train LeNet-5 with each normalization layer for several seeds, and compare",
        _add_compare,
        lambda a: config_from_args(a, norms=tuple(a.norms), seeds=tuple(range(a.seeds))),
    ),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except an unset option's (its help says what unset means) and a flag's."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnlab", description="Batch normalization experiments: LeNet-5 on CIFAR-10."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, add_arguments, _) in COMMANDS.items():
        command = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        add_arguments(command)
        command.set_defaults(command_parser=command)  # its errors show its own usage
    # Commands that run themselves rather than one comparison (they import this module).
    from bnlab import cli_diagnose, cli_study

    for name, module in (("study", cli_study), ("diagnose", cli_diagnose)):
        command = sub.add_parser(
            name, help=module.HELP, description=module.HELP, formatter_class=HelpFormatter
        )
        module.add_arguments(command)
        command.set_defaults(command_parser=command, command_main=module.main)
    return parser


def check_config(cfg: Config, parser: argparse.ArgumentParser) -> None:
    """Errors argparse cannot see alone: combinations, and the machine."""
    duplicated = sorted({n for n in cfg.norms if cfg.norms.count(n) > 1})
    if duplicated:
        parser.error(f"--norms: {', '.join(duplicated)} given more than once")
    with_bn = [n for n in cfg.norms if n != "none"]
    if cfg.batch_size < 2 and with_bn:
        parser.error(
            f"--batch-size {cfg.batch_size}: batch norm needs at least 2 images per batch "
            f"(norm {', '.join(with_bn)})"
        )
    if cfg.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (this torch or machine has no GPU)")
    on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.amp != "off" and on_cuda:
        parser.error(
            f"--amp {cfg.amp}: autocast is for the CPU, and these runs would train on CUDA "
            f"(--device {cfg.device}); add --device cpu, or leave out --amp"
        )
    if cfg.resume and cfg.out is None:
        parser.error("--resume needs --out DIR, the folder of the runs to continue")


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C would be: the same unwinding, the same message."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM (`kill`) and SIGHUP (a closed terminal) into an unwinding exception.

    Their default action ends the process on the spot; unwinding stops the
    workers and removes temporary files first. Only the command does this:
    run_compare, as a library call, leaves the caller's signal handlers alone.
    """
    before = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def say(text: str) -> None:
    """Print to stderr, which may be a terminal that is gone (SIGHUP)."""
    with contextlib.suppress(OSError):
        print(text, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:  # a torchrun rank
        from bnlab.experiments.distributed import leave

        leave(code)
    return code


def _main(argv: Sequence[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command_main", None) is not None:  # study, diagnose
        return args.command_main(args, argv)
    sub = args.command_parser
    cfg = COMMANDS[args.command][2](args)
    check_config(cfg, sub)

    # Imported here: the experiment pulls in the data package and tqdm, which
    # parsing (and `--help`) does not need.
    try:
        from bnlab.data import DataError
        from bnlab.experiments import distributed
        from bnlab.experiments.compare import ExperimentError, default_out
        from bnlab.experiments.ddp_command import run_command
        from bnlab.experiments.memory import keep_freed_memory
        from bnlab.experiments.results import RESULTS
        from bnlab.experiments.runner import RunFailed
    except ImportError as e:  # the layers need only torch; the experiment more
        print(
            f"bnlab: error: the experiment needs {e.name or 'a missing package'}: "
            "install it with pip install 'bnlab[experiment]'",
            file=sys.stderr,
        )
        return 1

    # This process is bnlab's own: it opts in to glibc keeping freed memory
    # (see memory.py). Library calls such as run_compare leave the allocator
    # alone; the worker processes they start opt in for themselves.
    keep_freed_memory()

    if cfg.out is None:
        cfg = dataclasses.replace(cfg, out=default_out(args.command))
    if getattr(args, "nproc", None) is not None:
        if distributed.launched():
            sub.error("--nproc: torchrun has started this process already; leave --nproc out")
        try:
            distributed.launch(args.nproc, argv, cfg, default_out=args.out is None)
        except ExperimentError as e:  # refused before any process starts
            sub.error(str(e))
    command = shlex.join(["bnlab", *argv])
    try:
        with stop_on_signals():
            run_command(cfg, command=command, kind=args.command)
    except ExperimentError as e:
        sub.error(str(e))
    except (DataError, RunFailed) as e:
        print(f"bnlab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        why = f"stopped by {e}" if isinstance(e, Stopped) else "interrupted"
        if not (Path(cfg.out) / RESULTS).is_file():  # stopped before the first save
            say(f"\n{why}; nothing was saved.")
        else:
            again = command
            if args.out is None:
                again += f" --out {shlex.quote(cfg.out)}"
            if not cfg.resume:
                again += " --resume"
            say(f"\n{why}; every finished epoch is saved. Continue with:\n  {again}")
        return 128 + (e.signum if isinstance(e, Stopped) else signal.SIGINT)
    return 0
