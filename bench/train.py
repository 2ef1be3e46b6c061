"""Student images/s with cached teacher targets, without distillation, and with the online teacher.

    python bench/train.py                      # CPU: DeiT-Ti (patch 4) at 32 px, a RegNetX-200MF teacher
    python bench/train.py --model deit_small_distilled_patch16_224 --img-size 224 --patch-size 0 \\
        --precision bf16 --zero 2 --teacher regnety_160 --batch-size 64    # GPU

One process, one rank: the same student, loader, views and threads in all three modes; only the teacher
targets differ (read from the store / none / the teacher run on every batch). The modes are measured in
turns for --rounds rounds (the order rotating each round, so no mode always follows the same one),
each turn timing --steps training steps after --warmup steps. Each mode's best turn is reported with
the ratios to `none`, as timeit does: on a shared machine a turn is only ever slowed by others' work,
and the turns of one mode swing by 20% here, so the median of a few turns ranks the modes by luck
(3 rounds with medians gave cached/none 1.075, 0.935, 1.035 and 0.925 in four runs). The teacher has
seeded random weights: speed does not depend on what it learned.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

DEIT_PIPE = [sys.executable, "-m", "deit_pipe.pipeline.cli"]
MODES = ("cached", "none", "online")


def prepare(tmp: Path, args) -> tuple[str, str, str]:
    """(shards, store, teacher weights) for --limit Fashion-MNIST images."""
    from deit_pipe.models.export import export_safetensors
    from deit_pipe.models.registry import create_teacher

    quiet = {"check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run([*DEIT_PIPE, "fashion-mnist", str(tmp / "fm"), "--limit", str(args.limit), "--val-limit", "10"],
                   **quiet)
    subprocess.run([*DEIT_PIPE, "shard", str(tmp / "fm"), str(tmp / "shards"), "--samples-per-shard", "250"], **quiet)
    torch.manual_seed(0)
    teacher, _ = create_teacher(args.teacher, 10, None, img_size=args.img_size)
    weights = str(tmp / "teacher.safetensors")
    export_safetensors(teacher, weights)
    subprocess.run([*DEIT_PIPE, "teacher-logits", str(tmp / "shards"), str(tmp / "store"), "--teacher", args.teacher,
                    "--teacher-weights", weights, "--views", str(args.repeats), "--img-size", str(args.img_size),
                    "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", args.device,
                    "--precision", args.precision], **quiet)
    return str(tmp / "shards"), str(tmp / "store"), weights


def steps(run):
    """train_step's arguments for epoch 0's steps, then epoch 1's, ... up to the run's last epoch, in one loader
    pass as train walks them."""
    batches = run.data.walk(0, 0, run.cfg.epochs)
    for epoch in range(run.cfg.epochs):
        steps_in = run.data.steps_in(epoch)
        for step, (_, batch, stored) in zip(range(steps_in), batches, strict=False):
            yield batch, stored, epoch, step, steps_in


def settle(run) -> None:
    """Wait for the batches still in flight: an empty pass resets the persistent loader, whose workers then idle
    (else they go on decoding into the next turn, of this run or of another)."""
    iter(run.data.loader(0, 0, 0))


def images_per_s(run, warmup: int, count: int, resident: bool = False) -> float:
    """Images/s of `count` training steps after `warmup`; `resident`: every step trains on the loader's first
    batch again, so the rate is the device's alone (what the loader must keep up with)."""
    available = sum(run.data.steps_in(e) for e in range(run.cfg.epochs))
    if warmup + count > available:
        raise SystemExit(f"a turn needs {warmup} + {count} steps, the run's epochs hold {available}: more images")
    it = steps(run)
    if resident:
        it = itertools.repeat(next(it))
        settle(run)
    for _ in range(warmup):
        run.train_step(*next(it))
    _sync(run.device)
    start = time.perf_counter()
    for _ in range(count):
        run.train_step(*next(it))
    _sync(run.device)
    seconds = time.perf_counter() - start
    settle(run)
    return count * run.cfg.engine.micro_batch / seconds


def measure(base, store: str, teacher: str, weights: str, img_size: int, rounds: int, warmup: int,
            count: int, resident: bool = False) -> tuple[dict, dict[str, list[float]]]:
    """The three modes of `base` (a TrainConfig) measured in turns, the order rotating each round:
    (their runs, images/s of each turn); `resident` adds each mode on one batch again and again ("<mode>,
    resident"): the device's own rates, whatever the loader keeps up with."""
    from deit_pipe.stages.train import CheckedConfig, StudentRun

    configs = {
        "cached": replace(base, distillation="hard", store=store),
        "none": replace(base, distillation="none", img_size=img_size),
        "online": replace(base, distillation="hard", teacher_online=teacher, teacher_weights=weights,
                          img_size=img_size),
    }
    runs = {mode: StudentRun(CheckedConfig.of(cfg, 1)) for mode, cfg in configs.items()}
    speeds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        for mode in MODES[r % len(MODES):] + MODES[:r % len(MODES)]:
            speeds[mode].append(images_per_s(runs[mode], warmup, count))
            if resident:
                speeds.setdefault(f"{mode}, resident", []).append(images_per_s(runs[mode], warmup, count, True))
    for run in runs.values():
        run.close()
    return runs, speeds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_tiny_distilled_patch16_224")
    ap.add_argument("--patch-size", type=int, default=4, help="ViT patch size override (0: the model's own)")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--teacher", default="regnetx_002", help="a RegNet: DeiT's is regnety_160")
    ap.add_argument("--limit", type=int, default=1500, help="train images")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for the store's teacher")
    args = ap.parse_args()

    from deit_pipe.distributed.deepspeed_engine import EngineSpec
    from deit_pipe.stages.train import StudentSpec, TrainConfig

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        shards, store, weights = prepare(tmp, args)
        base = TrainConfig(
            shards=shards, output=str(tmp / "run"), student=StudentSpec(args.model, patch_size=args.patch_size or None),
            epochs=args.repeats, repeats=args.repeats, workers=args.workers,
            engine=EngineSpec(args.zero, args.precision, args.batch_size),
        )
        runs, speeds = measure(base, store, args.teacher, weights, args.img_size, args.rounds, args.warmup,
                               args.steps)

    best = {mode: max(s) for mode, s in speeds.items()}
    print(f"student {args.model} (patch {args.patch_size or 'default'}) at {args.img_size} px, teacher {args.teacher}, "
          f"batch {args.batch_size}, ZeRO-{args.zero} {args.precision}, workers {args.workers}, "
          f"{torch.get_num_threads()} threads, device {runs['none'].device}")
    print(f"{args.steps} steps after {args.warmup} warmup, {args.rounds} rounds in turns; best images/s")
    print(f"{'mode':10}{'images/s':>10}{'vs none':>10}   per round")
    for mode in MODES:
        rounds = " ".join(f"{s:.0f}" for s in speeds[mode])
        print(f"{mode:10}{best[mode]:10.1f}{best[mode] / best['none']:10.3f}   {rounds}")
    print(f"ratio cached/none: {best['cached'] / best['none']:.3f} (goal >= 0.97); "
          f"online/none: {best['online'] / best['none']:.3f}")


if __name__ == "__main__":
    main()
