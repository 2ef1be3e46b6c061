"""The CLI run in the test's own process, as a user's shell would see it: exit status, stdout, stderr."""

from __future__ import annotations

import pytest

from deit_pipe.pipeline.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the CLI in this process."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(capsys, argv: list[str]) -> str:
    """The refusal of bad input: exit 2 and one line on stderr, never a traceback."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("deit-pipe: error: ")
    return err
