"""Object-store requests of each stage grow with the shards, not with the samples in them: counted by a proxy in
front of moto's S3 server, for every process a stage starts."""

from __future__ import annotations

import pytest
import torch
from cli_run import deit_pipe, tiny_teacher_logits, tiny_train_epoch

from deit_pipe.models.export import export_safetensors
from deit_pipe.models.registry import create_teacher

SHARDS = 4


def stage_requests(tmp_path, bucket: str, counter, per_shard: int, weights: str) -> dict[str, dict[str, int]]:
    """Requests of shard, teacher-logits and one training epoch over SHARDS shards of `per_shard` samples."""
    folder, shards, store = tmp_path / f"fm{per_shard}", f"{bucket}/shards{per_shard}", f"{bucket}/store{per_shard}"
    deit_pipe("fashion-mnist", str(folder), "--limit", str(SHARDS * per_shard), "--val-limit", "10")
    counter.take()
    counts = {}
    deit_pipe("shard", str(folder), shards, "--samples-per-shard", str(per_shard), "--workers", "1")
    counts["shard"] = counter.take()
    deit_pipe(*tiny_teacher_logits(shards, store, weights))
    counts["teacher-logits"] = counter.take()
    deit_pipe(*train_epoch(shards, str(tmp_path / f"run{per_shard}"), store, workers=0))
    counts["train epoch"] = counter.take()
    return counts


def train_epoch(shards: str, output: str, store: str, workers: int) -> list[str]:
    argv = tiny_train_epoch(shards, output, store)
    argv[argv.index("--workers") + 1] = str(workers)
    return argv


@pytest.mark.slow
def test_requests_per_stage_grow_with_shards_not_samples(tmp_path, s3_bucket, s3_proxy):
    """Each stage's requests grow with the shards, not with the samples in them; and a training rank GETs each
    shard once, however many loader workers it has: the DataLoader deals a shard's consecutive steps to different
    workers, which get the shard's bytes with the step (data.shard_feed)."""
    shard_gets: list[str] = []
    counter = s3_proxy(fault=lambda method, path, n: shard_gets.append(path) if method == "GET" and "/train-" in path
                       else None)
    torch.manual_seed(0)
    weights = str(tmp_path / "teacher.safetensors")
    export_safetensors(create_teacher("regnetx_002", 10, None)[0], weights)
    small = stage_requests(tmp_path, s3_bucket, counter, 25, weights)
    large = stage_requests(tmp_path, s3_bucket, counter, 100, weights)
    print(f"\nS3 requests over {SHARDS} shards, 3 views (25 and 100 samples per shard):")
    for stage in small:
        print(f"  {stage:15} {sum(small[stage].values()):5} {sum(large[stage].values()):5}  {small[stage]}")
    print("requests per stage (25 / 100 samples per shard): " + ", ".join(
        f"{stage} {sum(small[stage].values())} / {sum(large[stage].values())}" for stage in small))
    for stage in small:
        # The same shards holding 4x the samples: the same requests, give or take a listing.
        assert sum(large[stage].values()) <= sum(small[stage].values()) + 4, (stage, small, large)
    # A small constant per shard (teacher-logits: per shard and view, 7 arrays each), start-up included.
    bounds = {"shard": 20 * SHARDS, "teacher-logits": 25 * SHARDS * 3, "train epoch": 45 * SHARDS}
    assert all(sum(small[stage].values()) <= bound for stage, bound in bounds.items()), small

    reads = {}
    for workers in (0, 2):
        shard_gets.clear()
        deit_pipe(*train_epoch(f"{s3_bucket}/shards25", str(tmp_path / f"workers{workers}"), f"{s3_bucket}/store25",
                               workers))
        reads[workers] = sorted(path for path in shard_gets if path.endswith(".tar"))
    assert reads[0] and reads[2] == reads[0] and len(set(reads[0])) == len(reads[0]), reads
