"""The teacher store on its own (DESIGN invariant 3): units and their commit markers, a layout cut short,
refusals that name the field, the same store on S3 (moto's server), and the logit code kept once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from deit_pipe.errors import InputError
from deit_pipe.storage.location import join, put_atomic
from deit_pipe.storage.manifest import ShardManifest
from deit_pipe.storage.shards import ShardInfo
from deit_pipe.storage.teacher_store import TeacherStore, ViewRecord, store_binding

K = 3
RANK = 2  # logit code coordinates per view
TEACHER = {"name": "regnetx_002", "weights_sha256": "ab" * 32, "input": {"img_size": 32}, "precision": "fp32"}
RECIPE = {"img_size": 32, "seed": 0}


def manifest(num_samples: int = 10, per_shard: int = 4, num_classes: int = 5) -> ShardManifest:
    shards = -(-num_samples // per_shard)
    return ShardManifest("train", [f"c{i}" for i in range(num_classes)], num_samples, per_shard, 0,
                         [ShardInfo(f"train-{s:06d}.tar", 0, 0, "") for s in range(shards)], digest="d" * 64)


def binding(m: ShardManifest, **changes) -> dict:
    code = {"kind": "pca-int8", "rank": RANK, "step": 0.5, "fit_views": 9}
    return {**store_binding(m, "r" * 64, TEACHER, len(m.classes), K, code), **changes}


def record(n: int, seed: int) -> ViewRecord:
    rng = np.random.default_rng(seed)
    logits = -np.sort(-rng.normal(size=(n, K)), axis=1).astype(np.float16)
    return ViewRecord(logits, rng.integers(0, 5, (n, K)).astype(np.uint16), rng.normal(size=n).astype(np.float32),
                      rng.integers(-127, 128, (n, RANK)).astype(np.int8),
                      rng.integers(0, 10, n).astype(np.int32), rng.random(n).astype(np.float32),
                      rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32))


def create(url: str, m: ShardManifest, views: int = 2) -> TeacherStore:
    basis = np.eye(RANK, 5, dtype=np.float32)
    code = (np.zeros(5, np.float32), basis, np.full(RANK, 0.5, np.float32))
    return TeacherStore.create(url, "train", binding(m), views, {"recipe": RECIPE}, code,
                               {"views": 2, "kl_mean": [[1.0, 0.01]]})


@pytest.fixture(params=["local", "s3"])
def url(request, tmp_path):
    """The same tests on a local path and on S3 (moto's server on 127.0.0.1)."""
    if request.param == "local":
        return str(tmp_path / "store")
    return join(request.getfixturevalue("s3_bucket"), "store")


def test_units_round_trip_and_count_only_once_committed(url):
    m = manifest()
    store = create(url, m)
    assert store.committed_units() == set()
    last = record(2, seed=1)  # the last shard is short: ids 8, 9
    store.write_unit(2, 1, last)
    store.write_unit(0, 0, record(4, seed=0))
    # What a killed write leaves beside a marker is not a marker.
    put_atomic(join(url, "train", "_commits", "000001-00000.tmp-1234"), b"")
    assert store.committed_units() == {(0, 0), (2, 1)}
    got = TeacherStore.open(url, "train").read_unit(2, 1)
    for name in ("logits", "classes", "tail_lse", "code", "partner", "lam", "digest"):
        assert getattr(got, name).tobytes() == getattr(last, name).tobytes(), name
    with pytest.raises(InputError, match="shard 1 view 0 is not committed"):
        store.read_unit(1, 0)
    assert store.nbytes_stored() > 0


def test_a_layout_cut_short_is_no_store_and_is_laid_out_again(tmp_path):
    url = str(tmp_path / "store")
    zarr.open_group(join(url, "train"), mode="w").create_array("logits", shape=(1,), dtype="f2")  # then killed
    assert not TeacherStore.exists(url, "train")
    with pytest.raises(InputError, match="no teacher store"):
        TeacherStore.open(url, "train")
    store = create(url, manifest())
    assert TeacherStore.exists(url, "train") and store.group["logits"].shape == (10, 2, K)


def test_refusals_name_the_field_that_differs(tmp_path):
    m = manifest()
    store = create(str(tmp_path / "store"), m)
    store.check_binding(binding(m), RECIPE)  # the same binding passes

    def refusal(expected, recipe=None) -> str:
        with pytest.raises(InputError) as info:
            store.check_binding(expected, recipe)
        return str(info.value)

    assert "manifest_digest is 'dddddddddddd...' in the store but 'eeeeeeeeeeee...' here" in refusal(
        binding(m, manifest_digest="e" * 64))
    assert "recipe.seed is 0 in the store but 7 here" in refusal(binding(m, recipe_hash="x" * 64), {**RECIPE, "seed": 7})
    assert "recipe_hash is" in refusal(binding(m, recipe_hash="x" * 64))  # no recipe given: the hash is named
    assert "teacher.precision is 'fp32' in the store but 'bf16' here" in refusal(
        binding(m, teacher={**TEACHER, "precision": "bf16"}))
    assert "teacher.input.img_size is 32" in refusal(binding(m, teacher={**TEACHER, "input": {"img_size": 64}}))
    assert "k is 3 in the store but 4 here" in refusal(binding(m, k=4))
    assert all("\n" not in refusal(binding(m, **{f: "other"})) for f in ("split", "teacher", "num_classes"))


def test_appending_views_rewrites_no_chunk(tmp_path):
    url = str(tmp_path / "store")
    store = create(url, manifest())
    store.write_unit(1, 1, record(4, seed=3))
    chunks = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in Path(url).rglob("c/*/*") if p.is_file()}
    store.append_views(5)
    reopened = TeacherStore.open(url, "train")
    assert reopened.num_views == 5 and reopened.group["digest"].shape == (10, 5)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in chunks} == chunks
    assert reopened.read_unit(1, 1).digest.tobytes() == record(4, seed=3).digest.tobytes()
    # The other ranks wait for the grown layout's marker (DESIGN: `_commits/layout-<views>`), not for a day.
    markers = sorted(p.name for p in (Path(url) / "train" / "_commits").iterdir())
    assert markers == ["000001-00001", "layout", "layout-2", "layout-5"]


def test_the_logit_code_is_kept_once_and_bound(tmp_path):
    m = manifest()
    store = create(str(tmp_path / "store"), m)
    mean, basis, steps = TeacherStore.open(store.url, "train").code_arrays()
    assert mean.tobytes() == np.zeros(5, np.float32).tobytes()
    assert basis.tobytes() == np.eye(RANK, 5, dtype=np.float32).tobytes()
    assert steps.tobytes() == np.full(RANK, 0.5, np.float32).tobytes()
    assert store.attrs["code_error"] == {"views": 2, "kl_mean": [[1.0, 0.01]]}
    other = {"kind": "pca-int8", "rank": 3, "step": 0.5, "fit_views": 9}
    with pytest.raises(InputError, match="code.rank is 2 in the store but 3 here"):
        store.check_binding(binding(m, code=other))
