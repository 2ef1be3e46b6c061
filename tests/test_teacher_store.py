"""The teacher store on its own (DESIGN invariant 3): units and their commit markers, a layout cut short,
refusals that name the field, the same store on S3 (moto's server), and the logit code kept once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import zarr
from fsspec.core import url_to_fs

from deit_pipe.errors import InputError
from deit_pipe.storage import work_queue
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


def create(url: str, m: ShardManifest, views: int = 2, **changes) -> TeacherStore:
    basis = np.eye(RANK, 5, dtype=np.float32)
    code = (np.zeros(5, np.float32), basis, np.full(RANK, 0.5, np.float32))
    return TeacherStore.create(url, "train", binding(m, **changes), views, {"recipe": RECIPE}, code,
                               {"views": 2, "kl_mean": [[1.0, 0.01]]})


@pytest.fixture(params=["local", "memory", "s3"])
def url(request, tmp_path):
    """The same tests on a local path, on fsspec's memory file system (whose `ls`, as fsspec's base class
    has it, lists details unless told not to) and on S3 (moto's server on 127.0.0.1)."""
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "memory":
        return f"memory://{tmp_path.name}/store"
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
    # Another rank commits a unit after this one listed `_commits` (which s3fs caches): it counts at once.
    other_rank, marker = url_to_fs(join(url, "train", "_commits", "000001-00001"), skip_instance_cache=True)
    other_rank.pipe_file(marker, b"")
    assert store.is_committed(1, 1)


def test_a_units_seven_arrays_go_to_object_storage_at_once(s3_bucket, s3_proxy):
    """On S3 a unit's chunk PUTs, then its chunk GETs, are all in flight together (the proxy holds each 0.3 s):
    one after another, every unit a loader worker reads would cost 7 round trips instead of one."""
    chunk = re.compile(r"/c/\d+/\d+")  # zarr v3's default chunk keys: <array>/c/<i>/<j>[/<l>]
    proxy = s3_proxy(fault=lambda method, path, n: 0.3 if chunk.search(path) else None)
    url = join(s3_bucket, "store")
    store = create(url, manifest())
    proxy.peak.clear()
    store.write_unit(0, 0, record(4, seed=0))
    assert proxy.peak["PUT"] == 7
    reader = TeacherStore.open(url, "train")
    reader.read_unit(0, 0)  # opens each array (metadata GETs, one by one) on first use
    proxy.peak.clear()
    assert reader.read_unit(0, 0).digest.tobytes() == record(4, seed=0).digest.tobytes()
    assert proxy.peak["GET"] == 7


def test_a_layout_cut_short_is_no_store_and_is_laid_out_again(tmp_path):
    url = str(tmp_path / "store")
    zarr.open_group(join(url, "train"), mode="w").create_array("logits", shape=(1,), dtype="f2")
    put_atomic(join(url, "train", "_commits", "layout-2"), b"")  # then killed before `_commits/layout`
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
    assert "recipe.seed is 0 in the store but 7 here" in refusal(
        binding(m, recipe_hash="x" * 64), {**RECIPE, "seed": 7})
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
    # The handle that grew the store writes the new views (its arrays' shapes grew with it).
    store.write_unit(1, 4, record(4, seed=5))
    assert TeacherStore.open(url, "train").read_unit(1, 4).digest.tobytes() == record(4, seed=5).digest.tobytes()


def test_a_reader_opens_the_store_read_only(tmp_path):
    url = str(tmp_path / "store")
    create(url, manifest())
    with pytest.raises(ValueError, match="read-only"):
        TeacherStore.open(url, "train").write_unit(1, 1, record(4, seed=3))
    TeacherStore.open(url, "train", writable=True).write_unit(1, 1, record(4, seed=3))


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


def test_layout_is_one_chunk_per_unit_with_the_documented_types_and_codecs(tmp_path):
    """What other readers of the store rely on (module docstring): per-view arrays (N, V, ...) chunked
    (samples_per_shard, 1, ...) so one unit is one chunk, the documented dtypes, zero fill, and blosc zstd
    level 5, bit-shuffled except the int8 code (small integers compress best unshuffled)."""
    url = str(tmp_path / "store")
    create(url, manifest())
    want = {"logits": ((K,), "float16", "bitshuffle"), "classes": ((K,), "uint16", "bitshuffle"),
            "tail_lse": ((), "float32", "bitshuffle"), "code": ((RANK,), "int8", "noshuffle"),
            "partner": ((), "int32", "bitshuffle"), "lam": ((), "float32", "bitshuffle"),
            "digest": ((), "uint32", "bitshuffle")}
    for name, (tail, dtype, shuffle) in want.items():
        meta = json.loads((Path(url) / "train" / name / "zarr.json").read_text())
        assert meta["shape"] == [10, 2, *tail], name
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [4, 1, *tail], name
        assert (meta["data_type"], meta["fill_value"]) == (dtype, 0), name
        [blosc] = [codec["configuration"] for codec in meta["codecs"] if codec["name"] == "blosc"]
        assert (blosc["cname"], blosc["clevel"], blosc["shuffle"]) == ("zstd", 5, shuffle), name


def test_class_indices_widen_past_65535_classes(tmp_path):
    """uint16 holds class indices 0..65535, so up to 65535 classes they take 2 bytes; one more class and
    they must be int32, or the largest indices would wrap."""
    for num_classes, dtype in [(65535, np.uint16), (65536, np.int32)]:
        store = create(str(tmp_path / str(num_classes)), manifest(), num_classes=num_classes)
        assert store.group["classes"].dtype == dtype, num_classes


def test_a_store_of_code_rank_0_keeps_only_the_mean(tmp_path):
    """A code of rank 0 (top-k and tail only) has no code, code_basis or code_steps array (zarr wants no
    empty axis); readers still get the empty basis and steps and an (n, 0) code per unit."""
    url = str(tmp_path / "store")
    mean = np.arange(5, dtype=np.float32)
    empty = (mean, np.zeros((0, 5), np.float32), np.zeros(0, np.float32))
    store = TeacherStore.create(url, "train", binding(manifest(), code={"kind": "mean", "rank": 0}), 2,
                                {"recipe": RECIPE}, empty, {})
    arrays = sorted(p.name for p in (Path(url) / "train").iterdir() if (p / "zarr.json").exists())
    assert arrays == ["classes", "code_mean", "digest", "lam", "logits", "partner", "tail_lse"]
    got_mean, basis, steps = TeacherStore.open(url, "train").code_arrays()
    assert got_mean.tobytes() == mean.tobytes()
    assert (basis.shape, basis.dtype, steps.shape, steps.dtype) == ((0, 5), np.float32, (0,), np.float32)
    last = record(2, seed=4)  # the short last shard: rows 8, 9
    store.write_unit(2, 1, last)
    got = store.read_unit(2, 1)
    assert (got.code.shape, got.code.dtype) == ((2, 0), np.int8)
    assert got.logits.tobytes() == last.logits.tobytes() and got.digest.tobytes() == last.digest.tobytes()


def test_markers_are_empty_objects_and_nbytes_counts_every_file(tmp_path):
    """A commit marker says all by existing (an empty object, the cheapest PUT); nbytes_stored is the
    split's whole footprint on storage: chunks, metadata and markers, as the file system counts them."""
    url = str(tmp_path / "store")
    store = create(url, manifest())
    store.write_unit(0, 1, record(4, seed=5))
    markers = {p.name: p.stat().st_size for p in (Path(url) / "train" / "_commits").iterdir()}
    assert markers == {"layout": 0, "layout-2": 0, "000000-00001": 0}
    files = [p for p in (Path(url) / "train").rglob("*") if p.is_file()]
    assert store.nbytes_stored() == sum(p.stat().st_size for p in files)


def test_a_partial_binding_is_checked_field_by_field(tmp_path):
    """verify-store checks the teacher alone ({"teacher": {"weights_sha256": ...}}): fields missing from
    the expected binding are skipped, the ones given are still checked."""
    m = manifest()
    store = create(str(tmp_path / "store"), m)
    store.check_binding({"teacher": {"weights_sha256": "ab" * 32}})
    with pytest.raises(InputError, match="teacher.weights_sha256 is 'abababababab...' in the store but 'cdcd"):
        store.check_binding({"teacher": {"weights_sha256": "cd" * 32}})


def test_a_recipe_hash_the_recipe_settings_do_not_explain_is_named_itself(tmp_path):
    """When the recipe hashes differ but no setting of this run's recipe differs from the store's (here the
    run's recipe lacks one), the refusal names recipe_hash rather than passing or failing some other way."""
    m = manifest()
    store = create(str(tmp_path / "store"), m)
    with pytest.raises(InputError, match="recipe_hash is 'rrrrrrrrrrrr...' in the store but 'xxxxxxxxxxxx...' here"):
        store.check_binding(binding(m, recipe_hash="x" * 64), {"img_size": 32})


def test_a_store_without_provenance_is_refused_by_its_fields(tmp_path):
    """A store whose attributes lack the provenance (another writer, an older format) has no recipe to
    explain a hash with: it is still refused cleanly, naming the first field that differs."""
    m = manifest()
    store = create(str(tmp_path / "store"), m)
    del store.group.attrs["provenance"]
    store.group.attrs["format_version"] = 1
    with pytest.raises(InputError, match="format_version is 1 in the store but 3 here"):
        store.check_binding(binding(m), RECIPE)


def test_refusals_cut_only_values_longer_than_16_characters(tmp_path):
    """A 16-character value is shown whole; from 17 characters on (a digest) the first 12 and '...'."""
    m = manifest()
    store = create(str(tmp_path / "store"), m)
    with pytest.raises(InputError, match="split is 'train' in the store but 'abcdefghijklmnop' here"):
        store.check_binding(binding(m, split="abcdefghijklmnop"))
    with pytest.raises(InputError, match=re.escape("split is 'train' in the store but 'abcdefghijkl...' here")):
        store.check_binding(binding(m, split="abcdefghijklmnopq"))


def test_appending_no_more_views_writes_nothing(tmp_path):
    """Every rank's open_store may call append_views with the views the store already has (or fewer): no
    object is rewritten, so readers of a live store never see its metadata change under them."""
    url = str(tmp_path / "store")
    store = create(url, manifest())
    before = {p: p.stat().st_mtime_ns for p in Path(url).rglob("*") if p.is_file()}
    store.append_views(2)
    store.append_views(1)
    assert {p: p.stat().st_mtime_ns for p in Path(url).rglob("*") if p.is_file()} == before
    assert TeacherStore.open(url, "train").num_views == 2


def test_other_ranks_wait_for_the_layout_marker_of_their_view_count(tmp_path, monkeypatch):
    """wait_layout returns the store once `_commits/layout-<V>` exists, and when it gives up it says what it
    waited for. (wait_for's one-day timeout is cut to 0 s here: a wrong marker fails at once.)"""
    monkeypatch.setattr(work_queue, "WAIT_TIMEOUT", 0.0)
    url = str(tmp_path / "store")
    create(url, manifest()).append_views(5)
    waited = TeacherStore.wait_layout(url, "train", 5)
    assert (waited.url, waited.split, waited.num_views) == (url, "train", 5)
    missing = f"{url}/train/_commits/layout-7"
    with pytest.raises(InputError, match=re.escape(
            f"timed out waiting for the teacher store layout (7 views) at {url}: 1 missing, first {missing}")):
        TeacherStore.wait_layout(url, "train", 7)



def test_the_size_of_a_store_other_ranks_are_writing_is_listed_again_when_a_file_vanishes(tmp_path, monkeypatch):
    """Another rank's chunk write renames zarr's temporary file between du's listing and its stat of that file:
    the size is listed again instead of ending the run in a FileNotFoundError traceback."""
    from fsspec.implementations.local import LocalFileSystem

    url = str(tmp_path / "store")
    store = create(url, manifest())
    store.write_unit(0, 1, record(4, seed=5))
    du, vanished = LocalFileSystem.du, []

    def du_racing_a_rename(self, path, *args, **kwargs):
        if not vanished:
            vanished.append(path)
            raise FileNotFoundError(f"{path}/logits/c/0/1/0.partial")
        return du(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "du", du_racing_a_rename)
    files = [p for p in (Path(url) / "train").rglob("*") if p.is_file()]
    assert store.nbytes_stored() == sum(p.stat().st_size for p in files) and vanished
