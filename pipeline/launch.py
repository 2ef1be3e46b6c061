"""`--nproc-per-node N`: start N local ranks of the same command under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys


def _without_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def relaunch_under_torchrun(nproc: int) -> None:
    """Run this very command line again as N ranks; the cores are shared out so ranks do not fight."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = _without_flag(sys.argv[1:], "--nproc-per-node")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "deit_pipe.pipeline.cli", *args]
    code = subprocess.call(cmd, env=env)
    if code:
        sys.exit(code)
