"""The CLI as a user's shell would see it: run in the test's own process (exit status, stdout, stderr) or in a new
one; and the tiny teacher-logits and train settings the object-store tests run."""

from __future__ import annotations

import os
import subprocess
import sys

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


def deit_pipe(*args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """The CLI in a new process with `env` added to this one's, on one thread: outputs of different processes
    compare byte for byte. `check`: it must succeed."""
    proc = subprocess.run([sys.executable, "-m", "deit_pipe.pipeline.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=600)
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc


def tiny_teacher_logits(shards: str, store: str, weights: str) -> list[str]:
    """teacher-logits of a regnetx_002 (`weights`) over 3 views of 32 px, in one process."""
    return ["teacher-logits", shards, store, "--teacher", "regnetx_002", "--teacher-weights", weights, "--views", "3",
            "--img-size", "32", "--workers", "0", "--precision", "fp32"]


def tiny_train_epoch(shards: str, output: str, store: str) -> list[str]:
    """One epoch of a one-block DeiT on the store's targets, in one process."""
    return ["train", shards, "-o", output, "--logits", store, "--model", "deit_tiny_distilled_patch16_224",
            "--patch-size", "4", "--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--epochs", "1",
            "--repeats", "3", "--batch-size", "8", "--workers", "0", "--zero", "0", "--precision", "fp32"]
