"""`bnlab diagnose RUN_DIR`: print `bnlab.diagnose` for each run's checkpoint in a folder."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bnlab.cli import OPTIONS, add_config_options, int_at_least

HELP = (
    "diagnose the batch norms of every checkpoint in an experiment folder "
    "(train, compare or study): running vs population statistics, train/eval gap"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a run")
    parser.add_argument(
        "--batches",
        type=int_at_least(1),
        default=100,
        metavar="N",
        help="training batches to pool the population statistics over",
    )
    parser.add_argument(
        "--batch-size",
        type=int_at_least(2),
        default=None,
        metavar="B",
        help="images per batch (unset: the batch size the run trained with)",
    )
    keep = ("data_dir", "device")  # of the experiment's options, the ones that matter here
    add_config_options(parser, leave_out=tuple(n for n in OPTIONS if n not in keep))


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Diagnose every checkpoint under args.run_dir; the exit status."""
    parser = args.command_parser
    try:
        from bnlab.data import DataError, load_cifar10
        from bnlab.experiments.diagnose_runs import diagnose_folder, find_checkpoints
        from bnlab.experiments.outdir import ExperimentError
    except ImportError as e:
        print(
            f"bnlab: error: diagnose needs {e.name or 'a missing package'}: "
            "install it with pip install 'bnlab[experiment]'",
            file=sys.stderr,
        )
        return 1
    folder = Path(args.run_dir)
    try:
        checkpoints = find_checkpoints(folder)  # before the data are read: a refusal comes at once
        data = load_cifar10(args.data_dir, download=False)
        for section in diagnose_folder(
            folder,
            checkpoints,
            data,
            num_batches=args.batches,
            batch_size=args.batch_size,
            device=args.device,
        ):
            print(section, flush=True)
    except ExperimentError as e:
        parser.error(str(e))
    except DataError as e:
        print(f"bnlab: error: {e}", file=sys.stderr)
        return 1
    return 0
