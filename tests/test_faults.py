"""Faults on the way (issue 15): an object store failing some requests, or failing past the client's retries.

A proxy in front of moto's S3 answers 503 SlowDown instead of forwarding the requests a test picks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from deit_pipe.distributed.context import RankContext
from deit_pipe.stages import shard as shard_stage

SPS = "40"


def shard_cli(src: Path, dest: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deit_pipe.pipeline.cli", "shard", str(src), dest,
                           "--samples-per-shard", SPS, "--workers", "1"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **env})


def same_as_local(bucket_url: str, local: Path, s3_server: str) -> None:
    """Every manifest and shard of the S3 run, read from moto directly, equals the local run's bytes."""
    fs = fsspec.filesystem("s3", endpoint_url=s3_server, skip_instance_cache=True)
    root = bucket_url.removeprefix("s3://")
    for path in sorted(local.rglob("*")):
        rel = path.relative_to(local)
        if path.is_file() and (path.suffix == ".tar" or path.name == "manifest.json"):
            assert fs.cat_file(f"{root}/{rel}") == path.read_bytes(), rel


@pytest.fixture
def clean(fmnist_folder, tmp_path) -> Path:
    out = tmp_path / "clean"
    shard_stage.run(str(fmnist_folder), str(out), shard_stage.ShardOptions(samples_per_shard=int(SPS)), 1,
                    RankContext())
    return out


@pytest.mark.slow
def test_shard_through_a_store_failing_every_third_request_is_identical(fmnist_folder, clean, s3_bucket, s3_proxy,
                                                                        s3_server):
    proxy = s3_proxy(fault=lambda method, path, n: 503 if n % 3 == 0 else None)
    run = shard_cli(fmnist_folder, f"{s3_bucket}/shards")
    assert run.returncode == 0, run.stderr[-2000:]
    same_as_local(f"{s3_bucket}/shards", clean, s3_server)
    assert proxy.take()  # the run went through the proxy


@pytest.mark.slow
def test_a_store_failing_past_the_retries_is_one_line_exit_3_and_the_rerun_completes(fmnist_folder, clean, s3_bucket,
                                                                                     s3_proxy, s3_server):
    """Every PUT of the third train shard fails: the run ends with one line naming the operation and the object
    (exit 3: the service, not the input); a rerun once the store recovers finishes the rest, identical to a
    clean run. AWS_MAX_ATTEMPTS (botocore's retry budget) is cut to 2 to keep the test short."""
    s3_proxy(fault=lambda method, path, n: 503 if method == "PUT" and path.endswith("/train-000002.tar") else None)
    dest = f"{s3_bucket}/shards"
    failed = shard_cli(fmnist_folder, dest, AWS_MAX_ATTEMPTS="2")
    errors = [line for line in failed.stderr.replace("\r", "\n").splitlines() if line.startswith("deit-pipe")]
    assert failed.returncode == 3 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith(f"deit-pipe: error: write {dest}/train/train-000002.tar failed "
                                                     "("), errors
    assert "), also on retrying: " in errors[0]
    assert errors[0].endswith("rerun with the same arguments (committed work is kept)")
    s3_proxy()  # the store recovers
    rerun = shard_cli(fmnist_folder, dest)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    same_as_local(dest, clean, s3_server)
