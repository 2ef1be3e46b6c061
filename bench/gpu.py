"""The GPU check that bench/gpu.sh runs: one table of what runs where users run deit-pipe.

1. inference images/s of DeiT-Ti/S/B and the RegNetY-16GF teacher at 224 (DeiT's Table 1 column; V100 there),
   bf16 autocast, each with the largest batch that fits (`deit-pipe throughput`'s measurement);
2. `teacher-logits` with regnety_160 at 224 in its default precision (bf16 on a GPU), views/s of the whole stage
   against the teacher's bare forward on as many views (goal >= 0.9), loader workers on the node's cores;
3. `train --zero 2 --precision bf16` DeiT-S images/s with cached targets / no distillation / the online teacher
   (bench/train.py's modes; goals cached/none >= 0.97 and cached/online >= 2.0), fed by the loader, and again on
   one batch in memory: the device's own rates, which show whether the loader was the limit;
4. the train loader's images/s per worker at 224 with DeiT's recipe in steady state, as rank 0 of 3 without and
   with train's --exchange, and the workers one GPU needs to stay fed (the device's own rate without
   distillation over that rate).

Data: ImageNet-like JPEGs (bench/photos.py), 10 classes; teachers and students have seeded random weights (speed
depends on the architecture, not on what was learned). `--smoke` runs everything tiny on whatever device is
here, to check the script itself before a GPU is at hand.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loader as loader_bench  # noqa: E402
import train as train_bench  # noqa: E402
from photos import write_folder  # noqa: E402


def inference(args, device: torch.device) -> list[tuple[str, str]]:
    from deit_pipe.stages import throughput

    options = throughput.ThroughputOptions(img_size=args.img_size, batch=args.infer_batch, iters=args.iters)
    report = throughput.run(throughput.DEFAULT_MODELS, str(device), options)
    return [(f"inference {row['model']}", f"{row['images_per_s']:.0f} images/s at batch {row['batch']} "
             f"(paper, V100: {row['paper_v100']})") for row in report["models"]]


def teacher_logits(args, device: torch.device, shards: str, store: str, weights: str) -> list[tuple[str, str]]:
    from deit_pipe.data.recipe import ViewRecipe
    from deit_pipe.models.registry import create_teacher
    from deit_pipe.stages import teacher_logits as stage
    from deit_pipe.stages.throughput import AUTOCAST_DTYPES, images_per_s
    from deit_pipe.storage.manifest import ShardManifest

    precision = "bf16" if device.type == "cuda" else "fp32"
    spec, recipe = stage.TeacherSpec(args.teacher, weights, precision), ViewRecipe(img_size=args.img_size)
    # As bench/teacher_logits.py: the store made with one view first (its first run also fits the logit code, a
    # teacher pass over up to 4096 views no real store notices), then the views appended to it are timed.
    stage.run(shards, store, spec, recipe, views=1, batch_size=args.batch, workers=args.workers, device=device.type)
    views = ShardManifest.load(shards, "train").num_samples * args.views
    start = time.perf_counter()
    stage.run(shards, store, spec, recipe, views=1 + args.views, batch_size=args.batch, workers=args.workers,
              device=device.type)
    staged = views / (time.perf_counter() - start)
    from deit_pipe.models.precision import teacher_on

    # In the layout the stage runs it in (channels_last for a convnet on a GPU).
    model = teacher_on(create_teacher(args.teacher, 10, weights, img_size=args.img_size)[0], device)
    bare = images_per_s(model, args.batch, args.img_size, device, AUTOCAST_DTYPES[precision], warmup=3,
                        iters=max(1, views // args.batch))
    return [(f"teacher-logits {args.teacher} {precision}", f"{staged:.0f} views/s ({args.views} views appended to "
             f"a store of one), bare forward {bare:.0f}: ratio {staged / bare:.3f} (goal >= 0.9)")]


def train(args, device: torch.device, tmp: Path, shards: str, store: str, weights: str) -> tuple[list, float]:
    from deit_pipe.distributed.deepspeed_engine import EngineSpec
    from deit_pipe.stages.train import StudentSpec, TrainConfig

    precision = "bf16" if device.type == "cuda" else "fp32"
    base = TrainConfig(shards=shards, output=str(tmp / "run"), student=StudentSpec(args.student), epochs=3,
                       repeats=3, workers=args.workers, engine=EngineSpec(2, precision, args.batch))
    _, speeds = train_bench.measure(base, store, args.teacher, weights, args.img_size, args.rounds, args.warmup,
                                    args.steps, resident=True)
    best = {mode: max(s) for mode, s in speeds.items()}
    device_rate = best["none, resident"]
    return [(f"train {args.student} ZeRO-2 {precision}", f"cached {best['cached']:.0f}, none {best['none']:.0f}, "
             f"online {best['online']:.0f} images/s: cached/none {best['cached'] / best['none']:.3f} (goal >= 0.97), "
             f"cached/online {best['cached'] / best['online']:.2f} (goal >= 2.0)"),
            (f"train {args.student} ZeRO-2 {precision}, one batch in memory (the device's own rate, no loader)",
             f"cached {best['cached, resident']:.0f}, none {device_rate:.0f}, online {best['online, resident']:.0f} "
             f"images/s: cached/none {best['cached, resident'] / device_rate:.3f}, cached/online "
             f"{best['cached, resident'] / best['online, resident']:.2f}")], device_rate


def loader(args, shards: str, store: str, device_rate: float) -> list[tuple[str, str]]:
    # As rank 0 of a world of 3 (a node's GPUs): one copy of a sample per rank, so no decode shared among copies;
    # then with train's --exchange, making every copy of its third of each step's samples (one decode a sample).
    # Steady state (bench/loader.py), at batch 64 (DeiT's default): its three epochs are one pass of 93 batches for
    # 14 workers.
    bench_args = argparse.Namespace(batch=args.loader_batch, workers=args.workers)
    rows = []
    for exchange in (False, True):
        views = loader_bench.ours(shards, store, bench_args, 3, exchange=exchange)
        speed = max(loader_bench.images_per_s(views, args.workers) for _ in range(2))
        per_worker = speed / max(args.workers, 1)
        rows.append((f"loader at {args.img_size} px, {args.workers} workers, rank 0 of 3"
                     f"{' with --exchange' if exchange else ''}, batch {args.loader_batch}",
                     f"{speed:.0f} images/s in steady state, {per_worker:.0f} per worker: one GPU training without "
                     f"distillation at its own rate needs {device_rate / per_worker:.1f} workers"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="everything tiny, on whatever device is here")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cores = len(os.sched_getaffinity(0))
    if args.smoke:
        sizes = dict(img_size=64, images=24, infer_batch=2, iters=1, batch=4, loader_batch=4, views=2, workers=1,
                     rounds=1, warmup=1, steps=2, teacher="regnetx_002", student="deit_tiny_distilled_patch16_224")
    else:
        # Sized for steady state, not start-up (the first run's 1,500 images, 11 steps an epoch, timed mostly
        # loaders filling): a turn's warmup of workers + 1 steps gets past the fill (46 steps an epoch of 6,000),
        # and 30,000 teacher views (5 appended) keep the stage's start-up to a few seconds of its time.
        workers = max(1, cores - 2)
        sizes = dict(img_size=224, images=6000, infer_batch=None, iters=10, batch=128, loader_batch=64, views=5,
                     workers=workers, rounds=3, warmup=workers + 1, steps=30, teacher="regnety_160",
                     student="deit_small_distilled_patch16_224")
    args = argparse.Namespace(**vars(args), **sizes)
    from deit_pipe.stages.throughput import machine

    rows = [("machine", f"{machine(device)}, torch {torch.__version__}")]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        tmp = Path(tmp)
        write_folder(tmp / "photos", args.images, 10)  # first: its pool forks before CUDA starts here
        rows += inference(args, device)
        print(*rows, sep="\n", flush=True)
        from deit_pipe.distributed.context import RankContext
        from deit_pipe.models.export import export_safetensors
        from deit_pipe.models.registry import create_teacher
        from deit_pipe.stages import shard as shard_stage

        shards, store = str(tmp / "shards"), str(tmp / "store")
        options = shard_stage.ShardOptions(samples_per_shard=max(4, args.images // 8))
        shard_stage.run(str(tmp / "photos"), shards, options, args.workers, RankContext())
        torch.manual_seed(0)
        weights = str(tmp / "teacher.safetensors")
        export_safetensors(create_teacher(args.teacher, 10, None, img_size=args.img_size)[0], weights)
        rows += teacher_logits(args, device, shards, store, weights)
        print(*rows[-1:], sep="\n", flush=True)
        train_rows, device_rate = train(args, device, tmp, shards, store, weights)
        rows += train_rows
        print(*rows[-2:], sep="\n", flush=True)
        rows += loader(args, shards, store, device_rate)
    rows.append(("wall time", f"{time.time() - t0:.0f} s"))
    table = "\n".join(["| measurement | result |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
    # The train measurement keeps three runs' persistent loaders alive at once, so the workers of the later ones
    # inherit the earlier ones' by fork; on the H200 the interpreter's teardown of them hung after the table was
    # out. Everything is written: leave without the teardown.
    sys.stdout.flush()
    os._exit(0)
