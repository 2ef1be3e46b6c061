"""`--nproc-per-node N`: start N local ranks of the same command under torchrun's launcher."""

from __future__ import annotations

import logging
import os
import signal
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


# Set for the ranks of --nproc-per-node: the pid of the process they must not outlive.
LAUNCHER_PID = "DEIT_PIPE_LAUNCHER_PID"


def end_with_launcher() -> None:
    """In a rank started by --nproc-per-node: die with the process that started it, even by SIGKILL, which
    torchrun, running in that process, cannot forward. Its ranks sit in sessions of their own, so a kill of the
    launcher (or of its process group, as a test's timeout does) would leave them running, and ranks that only
    talk to each other (gloo, nccl) would run on: a hung run's two ranks took this machine's cores for half an hour."""
    launcher = os.environ.pop(LAUNCHER_PID, None)  # popped: not the business of the rank's own children
    if launcher is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1  # linux/prctl.h
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(launcher):  # the launcher died before the request took hold
        os._exit(1)


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
    os.environ[LAUNCHER_PID] = str(os.getpid())  # torchrun starts the ranks from this process's main thread
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
