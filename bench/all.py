"""Runs every stage benchmark in turn and prints one table of their ratios (`just bench`).

Each benchmark prints its own measurements and ends with `ratio ...` lines; this collects them.
Names pick which run (default all): `python bench/all.py train`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCHES = {
    "shard": (["bench/shard.py"], "shard images/s vs a webdataset ShardWriter loop (goal >= 1.0) and tar -cf"),
    "teacher-logits": (["bench/teacher_logits.py"],
                       "teacher-logits views/s vs raw teacher forward (goal >= 0.9 in the split layout)"),
    "teacher-code": (["bench/teacher_code.py"],
                     "bytes/view vs KL of the rebuilt teacher, real ImageNet teacher "
                     "(goal <= 200 B, KL <= 0.05 / 0.01)"),
    "train": (["bench/train.py"], "student images/s: cached targets vs no distillation (goal >= 0.97)"),
    "loader": (["bench/loader.py"], "train loader images/s vs ImageFolder + timm transforms + Mixup (goal >= 1.2)"),
    "requests": (["-m", "pytest", "-q", "-s", "-p", "no:logging", "tests/test_requests.py"],
                 "S3 requests per stage over 4 shards, 25 and 100 samples per shard (goal: the same)"),
}


def summary_lines(out: str) -> list[str]:
    """The lines of a benchmark's output that the summary table keeps."""
    keep = ("ratio", "bytes per view", "store, ", "(default)", "requests per stage")
    return [line.strip() for line in out.splitlines() if any(k in line for k in keep)]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHES)} (default: all)")
    chosen = ap.parse_args(argv).names or list(BENCHES)
    unknown = [n for n in chosen if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHES)}")
    root = Path(__file__).resolve().parent.parent
    rows = []
    for name in chosen:
        command, what = BENCHES[name]
        print(f"== {name}: {what}", flush=True)
        out = subprocess.run([sys.executable, *command], cwd=root, check=True, text=True,
                             stdout=subprocess.PIPE).stdout
        print(out, flush=True)
        rows += [(name, line) for line in summary_lines(out)]
    print("== summary")
    print(f"| {'stage':15} | measurement |")
    print(f"|{'-' * 17}|-------------|")
    for name, line in rows:
        print(f"| {name:15} | {line} |")


if __name__ == "__main__":
    main(sys.argv[1:])
