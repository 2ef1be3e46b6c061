"""Images/s of `deit-pipe shard` in copy mode next to a plain webdataset ShardWriter loop and GNU tar on the
same files, and the ratios.

    python bench/shard.py [--limit 0] [--val-limit 0] [--workers 0] [--repeats 2]

Builds a Fashion-MNIST ImageFolder (`deit-pipe fashion-mnist`), then times, side by side in this run,
`tar -cf` of the train/ and val/ folders, a single-process webdataset ShardWriter loop (read each file's
bytes, write it as .png with its .cls, 1000 per shard: what a user would write by hand; goal: shard >= 1.0x)
and `deit-pipe shard` into a fresh DEST (scan + shards + manifest, whole command wall time). All read warm
files from the page cache; best of --repeats.
The default is all 70,000 images, so that the command's fixed start-up (imports, worker processes:
about 2 s) weighs as it would on a real data set; at 12,000 images it is half the time. tar only
copies; the shard stage also decodes every image to vet it (truncated, bomb, mislabelled format),
reads each file twice (scan, then write in shuffled order) and writes three tar members per sample
(image, cls, idx), which is why its output is larger for 28x28 images.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEIT_PIPE = [sys.executable, "-m", "deit_pipe.pipeline.cli"]


def timed(cmd: list[str], out: Path) -> float:
    """Wall time of `cmd`, started with its output `out` (a file or folder) removed."""
    if out.is_dir():
        shutil.rmtree(out)
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def shardwriter_loop(src: Path, dest: Path) -> float:
    """Seconds of the plain loop: every class folder's files in sorted order into webdataset tars."""
    import webdataset as wds

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    start = time.perf_counter()
    for split in ("train", "val"):
        classes = sorted(p.name for p in (src / split).iterdir())
        with wds.ShardWriter(str(dest / f"{split}-%06d.tar"), maxcount=1000, verbose=0) as sink:
            for label, name in enumerate(classes):
                for path in sorted((src / split / name).iterdir()):
                    sink.write({"__key__": f"{name}/{path.stem}", "png": path.read_bytes(), "cls": label})
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=0, help="train images (0: all 60,000)")
    ap.add_argument("--val-limit", type=int, default=0, help="val images (0: all 10,000)")
    ap.add_argument("--workers", type=int, default=0, help="deit-pipe shard --workers (0 = one per core)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        tmp = Path(tmp)
        src = tmp / "fashion-mnist"
        subprocess.run(
            [*DEIT_PIPE, "fashion-mnist", str(src), "--limit", str(args.limit), "--val-limit", str(args.val_limit)],
            check=True, stdout=subprocess.DEVNULL,
        )
        images = sum(1 for p in src.rglob("*.png"))
        tar_cmd = ["tar", "-cf", str(tmp / "all.tar"), "-C", str(src), "train", "val"]
        shard_cmd = [*DEIT_PIPE, "shard", str(src), str(tmp / "shards"), "--workers", str(args.workers)]
        timed(tar_cmd, tmp / "all.tar")  # warm the page cache for both
        tar_s = min(timed(tar_cmd, tmp / "all.tar") for _ in range(args.repeats))
        shard_s = min(timed(shard_cmd, tmp / "shards") for _ in range(args.repeats))
        writer_s = min(shardwriter_loop(src, tmp / "wds") for _ in range(args.repeats))
        shard_bytes = sum(p.stat().st_size for p in (tmp / "shards").rglob("*.tar"))
        tar_bytes = (tmp / "all.tar").stat().st_size

    print(f"Fashion-MNIST ImageFolder: {images} PNG images (28x28), workers={args.workers or 'all cores'}")
    print(f"{'':24}{'seconds':>10}{'images/s':>12}{'MB out':>10}")
    print(f"{'tar -cf':24}{tar_s:10.2f}{images / tar_s:12.0f}{tar_bytes / 1e6:10.1f}")
    print(f"{'webdataset ShardWriter':24}{writer_s:10.2f}{images / writer_s:12.0f}")
    print(f"{'deit-pipe shard (copy)':24}{shard_s:10.2f}{images / shard_s:12.0f}{shard_bytes / 1e6:10.1f}")
    print(f"ratio shard/ShardWriter throughput: {writer_s / shard_s:.3f} (goal >= 1.0)")
    print(f"ratio shard/tar throughput: {tar_s / shard_s:.3f} (tar is {shard_s / tar_s:.1f}x faster)")


if __name__ == "__main__":
    main()
