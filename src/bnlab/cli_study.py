"""`bnlab study batch-size|eval-mode|lr`: the studies' command line, built as the experiment's is.

A study's own options come from the fields of its dataclass
(`bnlab.experiments.studies.config`), its training options from `Config` as
for `bnlab compare`, with the study's defaults; the option a study varies
itself (the batch size, the learning rate) is not offered. The study then
runs in its folder as a comparison does: Ctrl-C or `kill` stop it with every
finished epoch saved, and `--resume` continues it.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnlab.cli import (
    OPTIONS,
    HelpFormatter,
    Stopped,
    add_config_options,
    add_norms_option,
    add_seeds_option,
    check_config,
    config_from_args,
    int_at_least,
    positive_float,
    say,
    stop_on_signals,
)
from bnlab.experiments.config import Config
from bnlab.experiments.studies.config import (
    LR_SCALINGS,
    BatchSizeStudy,
    EvalModeStudy,
    LRStudy,
    Study,
)

HELP = "measure when batch norm and its fixes matter: batch-size, eval-mode or lr"
EVAL_MODE_NORMS = ("bn", "torch-bn", "renorm", "ghost")  # those with running statistics


@dataclass(frozen=True)
class _Command:
    help: str
    study: type[Study]
    varies: tuple[str, ...]  # Config options the study sets in each cell
    run: str  # its function in bnlab.experiments.studies


STUDIES = {
    "batch-size": _Command(
        "train each norm at each batch size: where batch norm breaks down, which fix holds",
        BatchSizeStudy,
        ("batch_size",),  # and the lr, scaled from --lr with the batch
        "run_batch_size_study",
    ),
    "eval-mode": _Command(
        "train a BN model, then evaluate it in each train/eval x track_running_stats cell, "
        "at several test batch sizes, and after precise_bn",
        EvalModeStudy,
        (),
        "run_eval_mode_study",
    ),
    "lr": _Command(
        "train with and without BN at each learning rate: does BN tolerate larger steps?",
        LRStudy,
        ("lr",),
        "run_lr_study",
    ),
}

# argparse settings of the studies' own fields; default and help come from the dataclasses.
_STUDY_OPTIONS: dict[str, dict[str, Any]] = {
    "batch_sizes": {"nargs": "+", "type": int_at_least(2), "metavar": "B"},
    "lr_scaling": {"choices": LR_SCALINGS},
    "eval_batch_sizes": {"nargs": "+", "type": int_at_least(2), "metavar": "B"},
    "precise_batches": {"type": int_at_least(1), "metavar": "N"},
    "lrs": {"nargs": "+", "type": positive_float, "metavar": "LR"},
}


def _default(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _add_study(parser: argparse.ArgumentParser, command: _Command) -> None:
    defaults = command.study()
    base = defaults.base
    for f in dataclasses.fields(command.study):
        if f.name != "base":
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                default=_default(getattr(defaults, f.name)),
                help=f.metadata["help"],
                **_STUDY_OPTIONS[f.name],
            )
    if command.study is EvalModeStudy:
        parser.add_argument(
            "--norm", default=base.norms[0], choices=EVAL_MODE_NORMS, help="the norm to train"
        )
    else:
        add_norms_option(parser, base.norms)
    add_seeds_option(parser, len(base.seeds), "in every cell")
    add_config_options(parser, leave_out=command.varies)
    # the study's training defaults, where they are not the experiment's
    parser.set_defaults(
        **{
            name: _default(getattr(base, name))
            for name in OPTIONS
            if name not in command.varies and getattr(base, name) != getattr(Config(), name)
        }
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`bnlab study`'s subcommands, one per study."""
    sub = parser.add_subparsers(dest="study", required=True, metavar="STUDY")
    for name, command in STUDIES.items():
        study = sub.add_parser(
            name, help=command.help, description=command.help, formatter_class=HelpFormatter
        )
        _add_study(study, command)
        study.set_defaults(study_parser=study)  # its errors show its own usage


def study_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Study:
    """The study the parsed options describe; argparse errors for what it cannot check alone."""
    command = STUDIES[args.study]
    norms = (args.norm,) if command.study is EvalModeStudy else tuple(args.norms)
    base = config_from_args(args, norms=norms, seeds=tuple(range(args.seeds)))
    check_config(base, parser)
    own = {}
    for f in dataclasses.fields(command.study):
        if f.name == "base":
            continue
        value = getattr(args, f.name)
        if isinstance(value, list):
            repeated = sorted({v for v in value if value.count(v) > 1})
            if repeated:
                option = "--" + f.name.replace("_", "-")
                parser.error(f"{option}: {', '.join(map(str, repeated))} given more than once")
            value = tuple(value)
        own[f.name] = value
    return command.study(base=base, **own)


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the study `args` name; the exit status."""
    parser = args.study_parser
    study = study_of(args, parser)
    try:  # the studies need the experiment's extra
        from bnlab.data import DataError
        from bnlab.experiments import studies
        from bnlab.experiments.memory import keep_freed_memory
        from bnlab.experiments.outdir import ExperimentError, default_out
        from bnlab.experiments.results import RESULTS
        from bnlab.experiments.runner import RunFailed

        run = getattr(studies, STUDIES[args.study].run)
    except ImportError as e:
        print(
            f"bnlab: error: the studies need {e.name or 'a missing package'}: "
            "install it with pip install 'bnlab[experiment]'",
            file=sys.stderr,
        )
        return 1
    keep_freed_memory()  # this process is bnlab's own (see cli.main)
    if study.base.out is None:
        base = dataclasses.replace(study.base, out=default_out(f"study-{args.study}"))
        study = dataclasses.replace(study, base=base)
    out = study.base.out
    command = shlex.join(["bnlab", *argv])
    try:
        with stop_on_signals():
            run(study, command=command)
    except ExperimentError as e:
        parser.error(str(e))
    except (DataError, RunFailed) as e:
        print(f"bnlab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        why = f"stopped by {e}" if isinstance(e, Stopped) else "interrupted"
        if not (Path(out) / RESULTS).is_file():
            say(f"\n{why}; nothing was saved.")
        else:
            again = command
            if args.out is None:
                again += f" --out {shlex.quote(out)}"
            if not study.base.resume:
                again += " --resume"
            say(f"\n{why}; every finished epoch is saved. Continue with:\n  {again}")
        return 128 + (e.signum if isinstance(e, Stopped) else signal.SIGINT)
    return 0
