"""Views/s of `deit-pipe teacher-logits` next to the bare teacher forward, and the store's bytes per view.

    python bench/teacher_logits.py [--teacher regnety_016] [--img-size 224] [--images 320] [--views 2]
                                   [--batch-size 32] [--cores N] [--loader-workers 1] [--repeats 3]

Throughput: `stages.teacher_logits.run` in this process (shards -> views rebuilt from the shards ->
teacher -> top-k -> Zarr store; the whole call, start-up and store layout included) against the same
teacher's forward alone on pre-made tensors (same model, batch, device, threads, fp32), run alternately
--repeats times each (the machine may be shared: every run is printed, the best of each counts).
The stage's timing includes its start-up (teacher creation, the first batch of views, the first
forward's warm-up), a fixed cost a real run spreads over 1.28 M images; 640 views keep it to about 2%.
It adds the views to a store that holds one already: the store's first run also fits the logit code
(a teacher pass over up to 4096 views), which 640 views would not spread.

Rebuilding a 224 px view costs about 3 ms of CPU (timm's transforms, the mix, the pixel digest); the
teacher takes the rest. Two layouts of the machine's --cores:
- split (the goal's): the teacher gets all cores but --loader-workers, and that many loader processes
  rebuild the views on the others. This is a GPU node's layout, where the teacher runs on the device and
  the views on cores it does not use: the ratio shows whether the stage keeps the teacher busy.
- shared: the teacher gets every core and the views are rebuilt between its batches (0 workers). On a
  CPU-only machine this gives the most views/s, but the view work adds to the teacher's (about 0.93
  here on 2 cores); a loader process on the teacher's cores only preempts its threads.

Real-size is a RegNetY at 224 px (random weights: the cost is the architecture's, not the weights');
the demo's setting (regnetx_002 at 32 px, split layout) shows a teacher so cheap that rebuilding views
dominates.

Bytes per view of the two Fashion-MNIST stores (10 classes: the top-10 is every class, the code 10
coordinates). A real 1000-class teacher's bytes per view, against the KL its code costs, are
bench/teacher_code.py's. Goal: ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.distributed.context import RankContext
from deit_pipe.models.registry import create_teacher
from deit_pipe.pipeline.fashion_mnist import DEFAULT_SOURCE, write_image_folder
from deit_pipe.stages import shard as shard_stage
from deit_pipe.stages import teacher_logits as stage
from deit_pipe.storage.manifest import ShardManifest
from deit_pipe.storage.teacher_store import TeacherStore

K = 10


def raw_forward_views_per_s(teacher: str, img_size: int, batch_size: int, views: int) -> float:
    """The teacher alone on pre-made tensors: the ceiling for the stage."""
    model, _ = create_teacher(teacher, 10, None, img_size=img_size)
    images = torch.randn(batch_size, 3, img_size, img_size)
    batches = max(1, views // batch_size)
    with torch.inference_mode():
        model(images)  # warm-up: allocator, oneDNN kernels
        start = time.perf_counter()
        for _ in range(batches):
            model(images)
    return batches * batch_size / (time.perf_counter() - start)


def stage_views_per_s(shards: str, store: str, teacher: str, img_size: int, views: int, batch_size: int,
                      workers: int) -> float:
    """Views/s of the stage adding `views` views a sample to a store that holds one: a store's first run also
    fits its logit code, a teacher pass over up to 4096 views that a 1.28 M-image store never notices but that
    would be half the work of this run; so that first run is not timed."""
    def run(total: int) -> dict:
        return stage.run(shards, store, stage.TeacherSpec(teacher, None, "fp32"), ViewRecipe(img_size=img_size),
                         views=total, k=K, batch_size=batch_size, workers=workers)

    run(1)
    start = time.perf_counter()
    summary = run(1 + views)
    return summary["views_written"] / (time.perf_counter() - start)


def compare(label: str, shards: str, store: str, teacher: str, img_size: int, views: int, batch_size: int,
            threads: int, workers: int, repeats: int) -> None:
    """Raw forward and stage alternately, `repeats` times each (a fresh store each time): best of each."""
    torch.set_num_threads(threads)
    n = ShardManifest.load(shards, "train").num_samples * views
    raw, staged = [], []
    for r in range(repeats):
        raw.append(raw_forward_views_per_s(teacher, img_size, batch_size, n))
        staged.append(stage_views_per_s(shards, f"{store}-{r}", teacher, img_size, views, batch_size, workers))
    print(f"{label}: {teacher} at {img_size} px, {n} views, batch {batch_size}, teacher threads {threads}, "
          f"loader workers {workers}, best of {repeats}")
    print(f"  raw teacher forward   {max(raw):9.2f} views/s  (runs: {', '.join(f'{x:.2f}' for x in raw)})")
    print(f"  teacher-logits stage  {max(staged):9.2f} views/s  (runs: {', '.join(f'{x:.2f}' for x in staged)})")
    print(f"  ratio stage/raw ({label})  {max(staged) / max(raw):.3f}")


def array_bytes_per_view(store: TeacherStore, views: int) -> str:
    fs = Path(store.url) / store.split
    total = store.group["tail_lse"].shape[0] * views
    return ", ".join(
        f"{name} {sum(p.stat().st_size for p in (fs / name).rglob('*') if p.is_file()) / total:.1f}"
        for name in ("logits", "classes", "tail_lse", "code", "partner", "lam", "digest") if (fs / name).exists()
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="regnety_016", help="real-size teacher (DeiT's is regnety_160)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--images", type=int, default=320, help="Fashion-MNIST train images for the real-size run")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                    help="cores to divide between the teacher and the loader (default: all this process may use)")
    ap.add_argument("--loader-workers", type=int, default=1,
                    help="loader processes of the split layout; the teacher gets the other cores")
    ap.add_argument("--demo-images", type=int, default=200)
    ap.add_argument("--demo-views", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="alternate runs of each; the best counts")
    args = ap.parse_args()
    if not 0 < args.loader_workers < args.cores:
        ap.error(f"--loader-workers must leave the teacher at least one of the {args.cores} cores")
    split = (args.cores - args.loader_workers, args.loader_workers)  # (teacher threads, loader workers)
    shared = (args.cores, 0)

    with tempfile.TemporaryDirectory(prefix="bench-teacher-logits-") as tmp:
        tmp = Path(tmp)
        ctx = RankContext()
        for name, images in (("real", args.images), ("demo", args.demo_images)):
            write_image_folder(str(tmp / name / "fm"), DEFAULT_SOURCE, limit=images, val_limit=1)
            shard_stage.run(str(tmp / name / "fm"), str(tmp / name / "shards"),
                            shard_stage.ShardOptions(samples_per_shard=max(1, images // 2)), 1, ctx)

        real, demo = str(tmp / "real" / "shards"), str(tmp / "demo" / "shards")
        compare("real-size, split", real, str(tmp / "real" / "store-split"), args.teacher, args.img_size, args.views,
                args.batch_size, *split, args.repeats)
        compare("real-size, shared", real, str(tmp / "real" / "store-shared"), args.teacher, args.img_size,
                args.views, args.batch_size, *shared, args.repeats)
        compare("demo, split", demo, str(tmp / "demo" / "store-split"), "regnetx_002", 32, args.demo_views,
                args.batch_size, *split, args.repeats)

        print(f"bytes per view at k={K} (store total incl. metadata and markers; per array in brackets):")
        for name in ("real", "demo"):
            store = TeacherStore.open(str(tmp / name / "store-split-0"), "train")
            manifest = ShardManifest.load(str(tmp / name / "shards"), "train")
            per_view = store.nbytes_stored() / (manifest.num_samples * store.num_views)
            print(f"  Fashion-MNIST {name} store, 10 classes, {manifest.samples_per_shard} samples/shard: "
                  f"{per_view:.1f}  [{array_bytes_per_view(store, store.num_views)}]")


if __name__ == "__main__":
    main()
