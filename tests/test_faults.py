"""Faults on the way (issue 15): an object store failing some requests, or failing past the client's retries.

A proxy in front of moto's S3 answers 500 or 503 instead of forwarding the requests a test picks, drops their
connections or holds them 2 s."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
import torch
from cli_run import deit_pipe, tiny_teacher_logits

from deit_pipe.distributed.context import RankContext
from deit_pipe.models.export import export_safetensors
from deit_pipe.models.registry import create_teacher
from deit_pipe.stages import shard as shard_stage

SPS = "40"
RERUN = "rerun with the same arguments (committed work is kept)"


def shard_cli(src: Path, dest: str, **env: str):
    return deit_pipe("shard", str(src), dest, "--samples-per-shard", SPS, "--workers", "1", check=False, **env)


def moto(s3_server: str):
    """The S3 filesystem of moto itself, past any proxy."""
    return fsspec.filesystem("s3", endpoint_url=s3_server, skip_instance_cache=True)


def same_as_local(url: str, local: Path, s3_server: str, kept=lambda rel: True) -> None:
    """The objects under `url`, read from moto directly, are the files under `local` byte for byte (those whose
    relative path is `kept`): none missing, none more."""
    fs, root = moto(s3_server), url.removeprefix("s3://")
    objects = {p.removeprefix(f"{root}/") for p in fs.find(root)}
    files = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    assert set(filter(kept, objects)) == set(filter(kept, files))
    for rel in filter(kept, files):
        assert fs.cat_file(f"{root}/{rel}") == (local / rel).read_bytes(), rel


def shards_and_manifests(rel: str) -> bool:
    return rel.endswith(".tar") or rel.endswith("/manifest.json")


def environment_fault(proc) -> str:
    """The line a run the object store failed past its retries ends in: exit 3, no traceback, nothing after it (the
    progress bars of the stage come before), saying a rerun resumes."""
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [line for line in lines if line.startswith("deit-pipe")] == lines[-1:], lines
    assert lines[-1].startswith("deit-pipe: error: ") and "), also on retrying: " in lines[-1], lines
    assert lines[-1].endswith(RERUN), lines
    return lines[-1]


def failing(method: str, path_part: str, status: int = 500):
    """The proxy's fault: every `method` request whose path holds `path_part` answered `status`."""
    return lambda request_method, path, n: status if request_method == method and path_part in path else None


@pytest.fixture
def clean(fmnist_folder, tmp_path) -> Path:
    out = tmp_path / "clean"
    shard_stage.run(str(fmnist_folder), str(out), shard_stage.ShardOptions(samples_per_shard=int(SPS)), 1,
                    RankContext())
    return out


@pytest.fixture(scope="module")
def tiny(fmnist_folder, tmp_path_factory) -> dict[str, Path]:
    """Local shards of 100 samples (two train shards: few requests, so the retries' backoff stays short), a
    teacher's weights, and a clean local run of teacher-logits (its store)."""
    root = tmp_path_factory.mktemp("tiny")
    runs = {"shards": root / "shards", "weights": root / "teacher.safetensors", "store": root / "store"}
    shard_stage.run(str(fmnist_folder), str(runs["shards"]), shard_stage.ShardOptions(samples_per_shard=100), 1,
                    RankContext())
    torch.manual_seed(0)
    export_safetensors(create_teacher("regnetx_002", 10, None)[0], str(runs["weights"]))
    deit_pipe(*tiny_teacher_logits(str(runs["shards"]), str(runs["store"]), str(runs["weights"])))
    return runs


@pytest.mark.slow
def test_shard_through_a_store_failing_every_third_request_is_identical(fmnist_folder, clean, s3_bucket, s3_proxy,
                                                                        s3_server):
    proxy = s3_proxy(fault=lambda method, path, n: 503 if n % 3 == 0 else None)
    run = shard_cli(fmnist_folder, f"{s3_bucket}/shards")
    assert run.returncode == 0, run.stderr[-2000:]
    same_as_local(f"{s3_bucket}/shards", clean, s3_server, shards_and_manifests)
    assert proxy.take()  # the run went through the proxy


@pytest.mark.slow
def test_a_store_failing_past_the_retries_is_one_line_exit_3_and_the_rerun_completes(fmnist_folder, clean, s3_bucket,
                                                                                     s3_proxy, s3_server):
    """Every PUT of the third train shard fails: the run ends with one line naming the operation and the object
    (exit 3: the service, not the input); a rerun once the store recovers finishes the rest, identical to a
    clean run. AWS_MAX_ATTEMPTS (botocore's retry budget) is cut to 2 to keep the test short."""
    s3_proxy(fault=failing("PUT", "/train-000002.tar", 503))
    dest = f"{s3_bucket}/shards"
    line = environment_fault(shard_cli(fmnist_folder, dest, AWS_MAX_ATTEMPTS="2"))
    assert line.startswith(f"deit-pipe: error: write {dest}/train/train-000002.tar failed ("), line
    s3_proxy()  # the store recovers
    rerun = shard_cli(fmnist_folder, dest)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    same_as_local(dest, clean, s3_server, shards_and_manifests)


# Where successive teacher-logits runs meet a store failing past its retries (each run finds what the earlier ones
# committed): the request that fails (method, part of its path) and what the one line names.
PAST_RETRIES = [
    ("HEAD", "/store/train/zarr.json", "lay out {store}/train"),  # zarr leaves coroutines unawaited here
    ("PUT", "/store/train/logits/c/1/2/0", "write {store} (shard 1, view 2)"),
    ("GET", "/store/train/zarr.json", "open {store}/train"),
    ("GET", "/store/train/code_mean/c/0", "read {store} (the logit code)"),
    ("GET", "prefix=store%2Ftrain%2F&delimiter=&", "list {store}/train"),  # the size of the store, at the end
]


@pytest.mark.slow
def test_teacher_logits_failing_past_the_retries_is_one_line_exit_3_and_the_rerun_completes(tiny, s3_bucket, s3_proxy,
                                                                                            s3_server):
    """Run after run, every try of one request fails (500) past a budget cut to 2 attempts: each run ends in one line
    naming the operation and the store, exit 3; once the store recovers, the rerun leaves the clean run's store."""
    store = f"{s3_bucket}/store"
    args = tiny_teacher_logits(str(tiny["shards"]), store, str(tiny["weights"]))
    for failing_method, failing_path, where in PAST_RETRIES:
        s3_proxy(fault=failing(failing_method, failing_path))
        line = environment_fault(deit_pipe(*args, check=False, AWS_MAX_ATTEMPTS="2"))
        assert line.startswith(f"deit-pipe: error: {where.format(store=store)} failed (OSError: [Errno 121] "), line
    s3_proxy()  # the store recovers
    deit_pipe(*args)
    same_as_local(store, tiny["store"], s3_server)
