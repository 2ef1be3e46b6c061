"""Faults on the way (issue 15): an object store failing some requests, or failing past the client's retries.

A proxy in front of moto's S3 answers 500 or 503 instead of forwarding the requests a test picks, drops their
connections or holds them 2 s."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pytest
import torch
from cli_run import deit_pipe, tiny_teacher_logits, tiny_train_epoch

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


def not_a_lease(rel: str) -> bool:
    return "/_lease/" not in f"/{rel}"  # the launch lease names its process and times: no two runs write it alike


def same_as_local(url: str, local: Path, s3_server: str, kept=not_a_lease) -> None:
    """The objects under `url`, read from moto directly, are the files under `local` byte for byte (those whose
    relative path is `kept`; by default all but the launch lease): none missing, none more."""
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
    assert lines[-1].startswith("deit-pipe: error: ") and "), also on retrying; " in lines[-1], lines
    assert lines[-1].endswith(RERUN), lines
    return lines[-1]


def failing(method: str, path_part: str, status: int = 500):
    """The proxy's fault: every `method` request whose path holds `path_part` answered `status`."""
    return lambda request_method, path, n: status if request_method == method and path_part in path else None


class FlakyStore:
    """The proxy's faults, by kind of request (GET, HEAD, PUT, POST, DELETE, list): the first of each kind and 30%
    of the rest answer 500 InternalError or 503 SlowDown (half each), 5% more close the connection unanswered (half
    of them before forwarding the request, half after: it took effect, its answer is lost), drawn from a generator
    seeded with the kind; one request from each number in DELAYED on is held 2 s. `requests`: kind -> what became
    of its requests -> count.

    Runs through it take botocore's standard retry mode (RETRY_MODE): the CLI's default, adaptive, also slows its
    own request rate after each SlowDown, which at 15% of requests whatever the rate about doubles the test's time
    for the same result."""

    RETRY_MODE = {"AWS_RETRY_MODE": "standard"}
    DELAYED = (10, 40, 70)

    def __init__(self):
        self.draws: dict[str, random.Random] = {}
        self.delays_due = list(self.DELAYED)
        self.requests: dict[str, Counter] = defaultdict(Counter)

    def __call__(self, method: str, path: str, n: int):
        kind = "list" if method == "GET" and "list-type=" in path else method
        draw = self.draws.setdefault(kind, random.Random(kind)).random()
        if not self.requests[kind]:
            fault = 500
        elif self.delays_due and n >= self.delays_due[0]:
            self.delays_due.pop(0)
            fault = "delay"
        elif draw < 0.15:
            fault = 500
        elif draw < 0.3:
            fault = 503
        elif draw < 0.325:
            fault = "drop"
        elif draw < 0.35:
            fault = "lose"
        else:
            fault = None
        self.requests[kind][fault or "forwarded"] += 1
        return fault

    def assert_met_every_fault(self, kinds: set[str]) -> None:
        """The run made requests of `kinds` (no other) and met errors on each kind, and every other fault."""
        print(f"\nrequests by kind and fate: {dict(self.requests)}")
        assert set(self.requests) == kinds and all(f[500] + f[503] for f in self.requests.values()), self.requests
        met = sum(self.requests.values(), Counter())
        assert met[500] and met[503] and met["drop"] and met["lose"] and met["delay"] == len(self.DELAYED), met


@pytest.fixture
def clean(fmnist_folder, tmp_path) -> Path:
    out = tmp_path / "clean"
    shard_stage.run(str(fmnist_folder), str(out), shard_stage.ShardOptions(samples_per_shard=int(SPS)), 1,
                    RankContext())
    return out


@pytest.fixture(scope="module")
def tiny(fmnist_folder, tmp_path_factory) -> dict[str, Path]:
    """Local shards of 100 samples (two train shards: few requests, so the retries' backoff stays short), a
    teacher's weights, and clean local runs of teacher-logits (its store) and of train on them (its output)."""
    root = tmp_path_factory.mktemp("tiny")
    runs = {"shards": root / "shards", "weights": root / "teacher.safetensors", "store": root / "store",
            "train": root / "train"}
    shard_stage.run(str(fmnist_folder), str(runs["shards"]), shard_stage.ShardOptions(samples_per_shard=100), 1,
                    RankContext())
    torch.manual_seed(0)
    export_safetensors(create_teacher("regnetx_002", 10, None)[0], str(runs["weights"]))
    deit_pipe(*tiny_teacher_logits(str(runs["shards"]), str(runs["store"]), str(runs["weights"])))
    deit_pipe(*tiny_train_epoch(str(runs["shards"]), str(runs["train"]), str(runs["store"])))
    return runs


def upload(local: Path, url: str, s3_server: str) -> str:
    moto(s3_server).put(str(local), url.removeprefix("s3://"), recursive=True)
    return url


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


@pytest.mark.slow
def test_teacher_logits_and_train_through_a_flaky_store_give_the_clean_runs_results(tiny, s3_bucket, s3_proxy,
                                                                                    s3_server, tmp_path):
    """Through an object store failing 30% of every kind of request, dropping some connections and holding a few,
    teacher-logits writes a store whose every object is the clean local run's file, and train, reading shards and a
    store from it, exports the clean run's student. The two run side by side: the retries' backoff (about 0.7 s a
    fault, a hundred faults each) is most of their time."""
    shards = upload(tiny["shards"], f"{s3_bucket}/shards", s3_server)
    read_store = upload(tiny["store"], f"{s3_bucket}/read-store", s3_server)
    flaky = FlakyStore()
    s3_proxy(fault=flaky)
    written_store = f"{s3_bucket}/store"
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(deit_pipe, *tiny_teacher_logits(str(tiny["shards"]), written_store, str(tiny["weights"])),
                            **flaky.RETRY_MODE),
                pool.submit(deit_pipe, *tiny_train_epoch(shards, str(tmp_path / "train"), read_store),
                            **flaky.RETRY_MODE)]
        for run in runs:
            run.result()
    same_as_local(written_store, tiny["store"], s3_server)
    assert (tmp_path / "train" / "student.safetensors").read_bytes() == \
        (tiny["train"] / "student.safetensors").read_bytes()
    flaky.assert_met_every_fault({"GET", "HEAD", "PUT", "POST", "DELETE", "list"})


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
