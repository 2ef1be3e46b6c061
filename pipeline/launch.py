"""`--nproc-per-node N`: start N local ranks of the same command under torchrun's launcher."""

from __future__ import annotations

import logging
import os
import sys

from deit_pipe.errors import InputError


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
    """Run this very command line again as N ranks; the cores are shared out so ranks do not fight.

    torchrun runs in this process so that a failed rank ends it with that rank's exit code: the rank
    has already printed its own one-line error, and torchrun's traceback of the failure would only bury it.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if int(os.environ.get("SLURM_NNODES", 1)) > 1 or "RANK" in os.environ or int(
            os.environ.get("SLURM_STEP_NUM_TASKS", 1)) > 1:
        raise InputError("--nproc-per-node starts the ranks of one node (torchrun --standalone); on several nodes "
                         "or under a launcher, start the ranks with torchrun --nnodes, srun or deepspeed (README)")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args([
        "--standalone", f"--nproc-per-node={nproc}", "-m", "deit_pipe.pipeline.cli",
        *_without_flag(sys.argv[1:], "--nproc-per-node"),
    ])
    try:
        run(args)
    except ChildFailedError as failed:
        _, failure = failed.get_first_failure()
        sys.exit(failure.exitcode if failure.exitcode > 0 else 1)
