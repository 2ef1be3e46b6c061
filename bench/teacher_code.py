"""Bytes per view against the KL of the rebuilt teacher, on a real ImageNet-1k teacher and mixed DeiT views.

    python bench/teacher_code.py [--fit 4096] [--test 1024]

The teacher is EfficientNet-Lite0 on mixed DeiT views of real photos (bench/real_teacher.py, cached). The
store's logit code is fitted on the first --fit views, exactly as `teacher-logits` fits it (LogitCode.fit),
and measured on the next --test views: each configuration writes those views as one unit of a real
TeacherStore (memory://, the store's own codecs) and reports the bytes of its per-view chunks per view
(the one-off code basis is printed apart: on ImageNet it is spread over 1.28M x 300 views), next to the
mean KL(teacher || rebuilt) at tau = 1 and 3. The first line is the store before the code: top-10 and a
flat tail (the leftover mass spread evenly), computed here from its definition. Goal: <= 0.05 nats at tau 1
and <= 0.01 at tau 3 in <= 200 bytes/view.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import fsspec
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from real_teacher import load_real_teacher_logits  # noqa: E402

from deit_pipe.loss.teacher_targets import LogitCode, StoreEntry, rebuild_kl  # noqa: E402
from deit_pipe.storage.teacher_store import CODE_ARRAYS, TeacherStore, ViewRecord  # noqa: E402

TAUS = (1.0, 3.0)
# (k, code rank, code step): today's default first, then the curve around it.
CONFIGS = [(10, 256, 0.7), (10, 0, 0.7), (10, 64, 0.7), (10, 128, 0.7), (10, 256, 0.5), (10, 256, 1.0),
           (10, 384, 0.7), (5, 256, 0.7), (20, 128, 0.7)]


def flat_tail_kl(logits: torch.Tensor, k: int, tau: float) -> float:
    """The store before the code: exact top-k, the leftover mass spread evenly over the other classes."""
    top, classes = logits.topk(k, dim=1)
    top = top.half().float()
    lse = torch.logsumexp(logits, dim=1, keepdim=True)
    leftover = (1 - torch.exp(top.double() - lse.double()).sum(1, keepdim=True)).clamp_min(1e-30)
    common = (lse.double() + torch.log(leftover / (logits.shape[1] - k))).float()
    rebuilt = common.expand_as(logits).scatter(1, classes, top)
    p = F.log_softmax(logits / tau, dim=1)
    return (p.exp() * (p - F.log_softmax(rebuilt / tau, dim=1))).sum(1).mean().item()


def stored_bytes_per_view(entry: StoreEntry, code: LogitCode, num_classes: int, rng) -> tuple[float, int]:
    """(bytes of the per-view chunks per view, bytes of the code's one-off arrays) in a real store."""
    n = len(entry.tail_lse)
    url = f"memory://teacher-code-bench/{rng.integers(1 << 62)}"
    binding = {"format_version": 2, "split": "train", "manifest_digest": "-", "num_samples": n, "samples_per_shard": n,
               "recipe_hash": "-", "teacher": {}, "num_classes": num_classes, "k": entry.topk_logits.shape[1],
               "code": {"kind": "pca-int8", "rank": code.rank, "step": 0, "fit_views": 0}}
    store = TeacherStore.create(url, "train", binding, 1, {}, code.arrays(), {})
    store.write_unit(0, 0, ViewRecord(
        logits=entry.topk_logits.numpy(), classes=entry.topk_classes.numpy(), tail_lse=entry.tail_lse.numpy(),
        code=entry.codes.numpy(),
        # Replay records as real ones look: partners within the shard, lambdas in (0, 1], random digests.
        partner=rng.permutation(n).astype(np.int32), lam=rng.uniform(0, 1, n).astype(np.float32),
        digest=rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)))
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://") + "/train"
    per_view = sum(fs.du(f"{root}/{name}/c", total=True)
                   for name in ("logits", "classes", "tail_lse", "code", "partner", "lam", "digest")
                   if fs.exists(f"{root}/{name}/c"))
    one_off = sum(fs.du(f"{root}/{name}", total=True) for name in CODE_ARRAYS if fs.exists(f"{root}/{name}"))
    fs.rm(url.removeprefix("memory://"), recursive=True)
    return per_view / n, one_off


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit", type=int, default=4096, help="views the code is fitted on (teacher-logits: 4096)")
    ap.add_argument("--test", type=int, default=1024, help="views it is measured on")
    args = ap.parse_args(argv)
    logits = torch.from_numpy(load_real_teacher_logits(args.fit + args.test))
    fit, test = logits[: args.fit], logits[args.fit :]
    rng = np.random.default_rng(0)
    print(f"EfficientNet-Lite0, {args.fit} views to fit the code, {len(test)} held-out mixed DeiT views (224 px)")
    print("| store | bytes/view | KL tau=1 | KL tau=3 | code basis (once per store) |")
    print("|---|---|---|---|---|")
    for k, rank, step in CONFIGS:
        code = LogitCode.fit(fit, rank, step)
        entry = StoreEntry.from_logits(test, k, code)
        kls = [rebuild_kl(test, entry, code, tau).mean().item() for tau in TAUS]
        per_view, one_off = stored_bytes_per_view(entry, code, logits.shape[1], rng)
        name = f"top-{k}, code rank {rank}, step {step:g}" + (" (default)" if (k, rank, step) == CONFIGS[0] else "")
        if rank == 0:  # the same bytes as the store before the code, which had no code array either
            flat = [flat_tail_kl(test, k, tau) for tau in TAUS]
            print(f"| top-{k}, flat tail (before the code) | {per_view:.1f} | {flat[0]:.4f} | {flat[1]:.4f} | - |")
        print(f"| {name} | {per_view:.1f} | {kls[0]:.4f} | {kls[1]:.4f} | {one_off / 1e6:.2f} MB |")


if __name__ == "__main__":
    sys.exit(main())
