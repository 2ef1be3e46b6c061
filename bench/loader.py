"""Our train loader against the loader DeiT users run, on the same ImageNet-like JPEGs, recipe, workers and cores.

    python bench/loader.py                     # 1200 photos at 224, 2 workers
    python bench/loader.py --images 4000 --workers 16

ours:   tar shards -> views rebuilt from the replay keys (timm's DeiT transform, then Mixup/CutMix per element)
        -> joined with the teacher store's rows -> DataLoader (data.view_dataset.TrainViews' loader);
theirs: torchvision ImageFolder + timm's create_transform with DeiT's arguments -> DataLoader -> timm's Mixup
        on each batch (DeiT's main.py), no teacher targets at all.

Both make one 224 px view per image of the epoch (ours: N/3 images x 3 repeats). Ours runs three times: as the
one rank of a world smaller than R = 3, whose batches hold the 3 copies of their samples (each decoded once for
all three); as rank 0 of a world of 3, whose batches hold one copy each (its epochs 0-2, so as many views as the
others); and as that rank with train's --exchange, making every copy of its third of each step's samples (the
all_to_all that then gives each rank its own batch runs in the train step, on the device: not timed here).
Measured in turns for --rounds rounds, each the best of its turns (timeit's rule on a shared
machine); prints images/s, images/s per worker and the ratios ours/theirs (goal >= 1.2), also as the
median of each round's own ratio.

Steady state, as on ImageNet, whose epochs are thousands of batches: the clock starts once the first batch of
every worker is out (a loader's first `workers` batches are made at once and come out after a whole batch's
work, however fast the workers then go), for both loaders alike. Rank 0 of 3 walks its three short epochs in one
pass, as train does.

Batch 64 a rank by default, DeiT's main.py default (its README trains DeiT-S and Ti at 256 a GPU): each run of a
batch along a shard's mixing cycle needs the view of one sample past its end, so ours makes n + 1 views for n at
best, and a small batch costs it more (at 32, a world < R item's 3 runs of ~11 make 3 extra: +9%).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import write_folder  # noqa: E402

DEIT_PIPE = [sys.executable, "-m", "deit_pipe.pipeline.cli"]


def prepare(tmp: Path, args) -> tuple[Path, str, str]:
    """(the ImageFolder, its shards, a teacher store of 3 views made by a small seeded teacher)."""
    folder = write_folder(tmp / "photos", args.images, args.classes)
    shards, store = str(tmp / "shards"), str(tmp / "store")
    quiet = {"check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run([*DEIT_PIPE, "shard", str(folder), shards, "--samples-per-shard", str(args.samples_per_shard)],
                   **quiet)
    subprocess.run([*DEIT_PIPE, "teacher-logits", shards, store, "--teacher", "regnetx_002", "--views", "3",
                    "--img-size", str(args.img_size), "--workers", str(args.workers), "--precision", "fp32",
                    "--device", args.device], **quiet)
    return folder, shards, store


def ours(shards: str, store: str, args, world: int, exchange: bool = False):
    from deit_pipe.data.recipe import ViewRecipe
    from deit_pipe.data.schedule import EpochPlan
    from deit_pipe.data.view_dataset import TrainViews
    from deit_pipe.data.views import ViewMaker
    from deit_pipe.storage.manifest import ShardManifest
    from deit_pipe.storage.teacher_store import TeacherStore

    manifest = ShardManifest.load(shards, "train")
    attrs = TeacherStore.open(store, "train").attrs
    maker = ViewMaker.for_store(ViewRecipe.from_dict(attrs["provenance"]["recipe"]), "train", attrs)
    views = TrainViews(shards, manifest, maker,
                       lambda epoch: EpochPlan(manifest.num_samples, epoch, 3, world, args.batch), rank=0, seed=0,
                       store_url=store, store_views=3, allow_view_reuse=False, workers=args.workers,
                       exchange=exchange)
    epochs = 1 if world < 3 else 3  # rank 0 of 3 makes a third of an epoch's views: walked in one pass, as train
    return lambda: ((batch.images, batch.label) for _, batch, _ in views.walk(0, 0, epochs))


def theirs(folder: Path, args):
    from timm.data import Mixup, create_transform
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    # DeiT's main.py: build_transform(is_train=True) and its Mixup arguments.
    transform = create_transform(input_size=args.img_size, is_training=True, color_jitter=0.3,
                                 auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25,
                                 re_mode="pixel", re_count=1)
    dataset = ImageFolder(str(folder / "train"), transform=transform)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                  label_smoothing=0.1, num_classes=args.classes)

    def epoch():
        loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=True,
                            prefetch_factor=4 if args.workers else None)
        for images, labels in loader:
            yield mixup(images, labels)

    return epoch


def images_per_s(batches, fill: int) -> float:
    """Images/s of the pass `batches()` gives ((images, labels) batches), timed from its `fill`-th batch on."""
    batches = batches()
    for _ in range(fill):
        next(batches, None)
    start, count = time.perf_counter(), 0
    for images, _ in batches:
        count += len(images)
    return count / (time.perf_counter() - start)


def cpu_ms_per_view(loaders: dict) -> dict[str, float]:
    """CPU milliseconds a view of each loader's pass, made in this process on one thread (`loaders` were built with
    no workers), a batch of each in turn: a drift of the machine's speed then falls on all of them alike, and CPU
    time leaves out what other tenants take. What a core spends on a view, whatever the wall clock does."""
    threads, cpu, views = torch.get_num_threads(), dict.fromkeys(loaders, 0.0), dict.fromkeys(loaders, 0)
    torch.set_num_threads(1)
    try:
        passes = {name: batches() for name, batches in loaders.items()}
        while passes:
            for name in list(passes):
                start = time.process_time()
                batch = next(passes[name], None)
                cpu[name] += time.process_time() - start
                if batch is None:
                    del passes[name]
                else:
                    views[name] += len(batch[0])
    finally:
        torch.set_num_threads(threads)
    return {name: 1e3 * cpu[name] / views[name] for name in loaders}


def loaders_of(folder: Path, shards: str, store: str, args) -> dict:
    return {"ours": ours(shards, store, args, 1), "ours/3": ours(shards, store, args, 3),
            "ours/3x": ours(shards, store, args, 3, exchange=True), "theirs": theirs(folder, args)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--samples-per-shard", type=int, default=100)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64, help="a rank's batch (DeiT's main.py default)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for the store's teacher")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        folder, shards, store = prepare(Path(tmp), args)
        loaders = loaders_of(folder, shards, store, args)
        speeds: dict[str, list[float]] = {name: [] for name in loaders}
        for r in range(args.rounds):
            for name in (list(loaders) if r % 2 == 0 else reversed(loaders)):
                speeds[name].append(images_per_s(loaders[name], args.workers))
        cpu = cpu_ms_per_view(loaders_of(folder, shards, store, argparse.Namespace(**{**vars(args), "workers": 0})))
    best = {name: max(s) for name, s in speeds.items()}
    cores = max(args.workers, 1)
    print(f"{args.images} JPEGs 500x375 q90 -> {args.img_size} px, DeiT's recipe, batch {args.batch}, "
          f"{args.workers} workers on {os.cpu_count()} cores; best of {args.rounds} rounds; steady state (each "
          f"pass from its batch {args.workers} on)")
    print(f"{'loader':8}{'images/s':>10}{'per worker':>12}   per round")
    for name in loaders:
        print(f"{name:8}{best[name]:10.1f}{best[name] / cores:12.1f}   {' '.join(f'{s:.0f}' for s in speeds[name])}")
    print("ours: a world smaller than R = 3 (the copies of a sample in one batch); ours/3: rank 0 of a world of 3; "
          "ours/3x: the same rank with train --exchange (it makes every copy of its third of each step's samples; "
          "the all_to_all that delivers them is the train step's, not timed here)")
    print(f"ratio loader ours/theirs: {best['ours'] / best['theirs']:.3f} (goal >= 1.2); "
          f"ours {best['ours'] / cores:.1f} images/s per worker at {args.img_size} px")
    for name in ("ours/3", "ours/3x"):
        print(f"ratio loader {name}/theirs: {best[name] / best['theirs']:.3f} (goal >= 1.2); "
              f"{name} {best[name] / cores:.1f} images/s per worker at {args.img_size} px")
    # A round's passes meet about the same load; the best of each can come from different moments of a VM whose
    # speed drifts, a round's own ratio cannot.
    for name in ("ours", "ours/3", "ours/3x"):
        paired = [ours_ / theirs_ for ours_, theirs_ in zip(speeds[name], speeds["theirs"], strict=True)]
        print(f"ratio loader {name}/theirs within each round: median {statistics.median(paired):.3f} "
              f"({', '.join(f'{r:.3f}' for r in paired)})")
    print("CPU ms a view, one process, one thread, the loaders' batches in turns: "
          + ", ".join(f"{name} {ms:.2f}" for name, ms in cpu.items()))
    for name in ("ours", "ours/3", "ours/3x"):
        print(f"ratio loader CPU {name}/theirs: {cpu['theirs'] / cpu[name]:.3f} (views a core makes, ours over theirs)")


if __name__ == "__main__":
    main()
