"""Running the bnlab command inside a test."""

from __future__ import annotations

import pytest

from bnlab.cli import main


def error_of(argv: list[str], capsys) -> str:
    """The usage error `bnlab ARGV` prints (it must exit with status 2)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err
