"""`deit-pipe teacher-logits` and `verify-store` (DESIGN invariants 2 and 3): the store agrees with the
teacher re-run on replayed views, the mixed view is what was scored, S3 through moto's server, two ranks,
a SIGKILL and rerun, appended views, and one-line refusals naming the field that differs.

Tiny settings throughout: 200 Fashion-MNIST images in 25-sample shards, 32 px views, regnetx_002.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import timm
import torch

from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.data.view_dataset import ViewDataset
from deit_pipe.data.view_plan import cycle_order, unit_items
from deit_pipe.data.views import ViewMaker
from deit_pipe.distributed.context import RankContext
from deit_pipe.models.export import export_safetensors
from deit_pipe.models.registry import create_teacher
from deit_pipe.pipeline.cli import main as cli_main
from deit_pipe.stages import shard as shard_stage
from deit_pipe.stages import teacher_logits as stage
from deit_pipe.stages import verify_store
from deit_pipe.storage.location import join
from deit_pipe.storage.manifest import ShardManifest, shard_url
from deit_pipe.storage.shards import read_shard
from deit_pipe.storage.teacher_store import TeacherStore

TEACHER = "regnetx_002"
IMG = 32
VIEWS = 2
K = 5
BATCH = 16
ARRAYS = ("logits", "classes", "tail_lse", "code", "partner", "lam", "digest")
# One thread everywhere (here and in subprocesses): stores written by different processes compare byte for byte.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def shard(src: Path, dest: Path, seed: int = 0) -> str:
    shard_stage.run(str(src), str(dest), shard_stage.ShardOptions(samples_per_shard=25, seed=seed), 1, RankContext())
    return str(dest)


def make_teacher_weights(path: Path, shards: str, num_classes: int = 10, seed: int = 0) -> str:
    """A random regnetx_002 whose head is calibrated on some views (features standardised, random
    projection): its top-1 varies from view to view, as a trained teacher's does, unlike a raw random
    head, which gives one class to every input."""
    torch.manual_seed(seed)
    model = timm.create_model(TEACHER, num_classes=num_classes).eval()
    maker = ViewMaker(ViewRecipe(img_size=IMG), "train")
    samples = list(read_shard(shard_url(shards, "train", 1)))
    with torch.no_grad():
        images = torch.stack([maker.unmixed(s, 99) for s in samples])
        features = model.forward_head(model.forward_features(images), pre_logits=True)
        std = features.std(0)
        head = model.get_classifier()
        head.weight.copy_(torch.randn(num_classes, features.shape[1]) / std.clamp_min(std.mean()) * 0.5)
        head.bias.copy_(-head.weight @ features.mean(0))
    export_safetensors(model, str(path))
    return str(path)


def teacher_logits(shards: str, store: str, weights: str | None, views: int = VIEWS, seed: int = 0,
                   img_size: int = IMG, teacher: str = TEACHER, workers: int = 0) -> dict:
    return stage.run(shards, store, stage.TeacherSpec(teacher, weights, "fp32"),
                     ViewRecipe(img_size=img_size, seed=seed), views=views, k=K, batch_size=BATCH, workers=workers)


def cli_args(shards, store, weights, views: int = VIEWS, *extra) -> list[str]:
    args = ["teacher-logits", shards, store, "--teacher", TEACHER, "--views", str(views), "--topk", str(K),
            "--img-size", str(IMG), "--batch-size", str(BATCH), "--precision", "fp32", "--workers", "0", *extra]
    return [str(a) for a in args] + (["--teacher-weights", str(weights)] if weights else [])


def cli(*args, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deit_pipe.pipeline.cli", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )


def arrays(store: str) -> dict[str, np.ndarray]:
    group = TeacherStore.open(store, "train").group
    return {name: group[name][:] for name in ARRAYS}


def assert_same_arrays(store: str, reference: str) -> None:
    got, want = arrays(store), arrays(reference)
    for name in ARRAYS:
        assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), name


def chunk_files(store: Path) -> dict[str, tuple[bytes, int]]:
    """Chunk object -> (bytes, mtime) for every array chunk of the train split."""
    return {
        str(p.relative_to(store)): (p.read_bytes(), p.stat().st_mtime_ns)
        for name in ARRAYS for p in sorted((store / "train" / name / "c").rglob("*")) if p.is_file()
    }


def all_units(shards: str, views: int) -> set[tuple[int, int]]:
    return {(s, v) for s in range(ShardManifest.load(shards, "train").num_shards) for v in range(views)}


def refused(capsys, *args) -> str:
    """Run the CLI in this process; it must exit 2 with one `deit-pipe: error:` line on stderr."""
    capsys.readouterr()  # drop what earlier steps printed
    with pytest.raises(SystemExit) as exit_info:
        cli_main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deit-pipe: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def shards(fmnist_folder, tmp_path_factory) -> str:
    return shard(fmnist_folder, tmp_path_factory.mktemp("tl") / "shards")


@pytest.fixture(scope="module")
def weights(shards, tmp_path_factory) -> str:
    return make_teacher_weights(tmp_path_factory.mktemp("teacher") / "teacher.safetensors", shards)


@pytest.fixture(scope="module")
def reference(shards, weights, tmp_path_factory) -> str:
    """An uninterrupted one-rank run: what every other way of making the store must equal."""
    store = str(tmp_path_factory.mktemp("reference") / "store")
    summary = teacher_logits(shards, store, weights)
    assert summary["views_written"] == summary["views_total"] == 200 * VIEWS
    return store


# ------------------------------------------------------------------ the store is the teacher's output


def test_verify_store_reruns_the_teacher_and_agrees(shards, weights, reference, capsys):
    report = verify_store.run(shards, reference, weights, units=100, max_views_per_unit=25)
    assert report["views_checked"] == 200 * VIEWS
    assert report["digest_match_rate"] == 1.0 and report["top1_match_rate"] == 1.0
    assert report["max_logit_error_fp16_ulps"] <= 1.0  # fp16 rounding of an fp32 recompute
    # 10 classes, k = 5, a code of rank 10 (an orthonormal basis of all classes): each rebuilt logit is off by
    # the rounding of the coordinates, variance step^2 / 12, so KL ~ Var_p(error / tau) / 2 <= step^2 / (24 tau^2).
    step = TeacherStore.open(reference, "train").code_arrays()[2].max()
    for tau in (1, 3):
        assert 0 < report[f"target_kl_mean_tau{tau}"] < 1.5 * step**2 / (24 * tau**2)
    assert report["views_stored"] == 200 * VIEWS
    # Every object of the split, counted here from the files themselves.
    on_disk = sum(p.stat().st_size for p in (Path(reference) / "train").rglob("*") if p.is_file())
    assert report["store_bytes"] == on_disk and report["bytes_per_view"] == on_disk / (200 * VIEWS)

    cli_main(["verify-store", shards, reference, "--teacher-weights", weights])
    out = capsys.readouterr().out
    assert "bytes/view" in out and "digest match 1.0000" in out and "top-1 match 1.0000" in out


def test_teacher_on_replayed_views_agrees_with_every_stored_row(shards, weights, reference):
    """Directly, without verify-store: every unit rebuilt from its shard and scored in one batch."""
    model, _ = create_teacher(TEACHER, 10, weights)
    manifest = ShardManifest.load(shards, "train")
    store = TeacherStore.open(reference, "train")
    maker = ViewMaker(ViewRecipe(img_size=IMG), "train")
    for s in range(manifest.num_shards):
        samples = list(read_shard(shard_url(shards, "train", s)))
        for v in range(VIEWS):
            batch = maker.shard_views(samples, s, v)
            with torch.inference_mode():
                logits = model(batch.images)
            stored = store.read_unit(s, v)
            np.testing.assert_array_equal(stored.classes[:, 0], logits.argmax(1).numpy())
            recomputed = np.take_along_axis(logits.numpy(), stored.classes.astype(np.int64), axis=1)
            assert verify_store.fp16_ulps(stored.logits, recomputed).max() <= 1.0
            below_top_k = logits.sort(dim=1, descending=True).values[:, K:]
            # The stage scored other batches: float32 logits that differ in their last bits (SIMD paths by batch
            # size) move an lse by as much in absolute terms, which near 0 is no small relative error.
            np.testing.assert_allclose(stored.tail_lse, torch.logsumexp(below_top_k, 1).numpy(), rtol=1e-5, atol=1e-4)
            np.testing.assert_array_equal(stored.partner, batch.partner.numpy())
            np.testing.assert_array_equal(stored.lam, batch.lam.numpy())
            np.testing.assert_array_equal(stored.digest, batch.digest.numpy())


def test_the_teacher_scored_the_mixed_view_not_an_unmixed_one(shards, weights, reference):
    model, _ = create_teacher(TEACHER, 10, weights)
    store = TeacherStore.open(reference, "train")
    maker = ViewMaker(ViewRecipe(img_size=IMG), "train")
    telling = 0
    for s in range(4):
        samples = list(read_shard(shard_url(shards, "train", s)))
        position = {x.idx: p for p, x in enumerate(samples)}
        for v in range(VIEWS):
            batch = maker.shard_views(samples, s, v)
            with torch.inference_mode():
                mixed = model(batch.images).argmax(1).numpy()
                unmixed = model(torch.stack([maker.unmixed(x, v) for x in samples])).argmax(1).numpy()
            own = unmixed
            partner = unmixed[[position[int(i)] for i in batch.partner]]
            differs = (mixed != own) & (mixed != partner)
            stored = store.read_unit(s, v).classes[:, 0]
            np.testing.assert_array_equal(stored[differs], mixed[differs])
            telling += int(differs.sum())
    assert telling >= 5  # enough views where the three answers differ for the check to mean something


def test_the_store_records_the_device_its_teacher_ran_on(reference):
    """verify-store on a GPU against a store made on a CPU (or the other way) shows where each ran."""
    assert TeacherStore.open(reference, "train").attrs["provenance"]["device"] == "cpu"


def test_random_weights_store_is_checked_by_digest_only(shards, tmp_path, capsys):
    store = str(tmp_path / "store")
    teacher_logits(shards, store, None, views=1)
    report = verify_store.run(shards, store, None)
    assert report["teacher_rerun"] is False and report["digest_match_rate"] == 1.0
    assert "top1_match_rate" not in report
    cli_main(["verify-store", shards, store])
    out = capsys.readouterr().out
    assert "teacher not re-run" in out and "random-weights" in out and "top-1" not in out


# ------------------------------------------------------------------------- resume, append, ranks


def test_appending_views_leaves_old_chunks_alone(shards, weights, reference, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(reference, store)  # copy2: bytes and mtimes kept
    before = chunk_files(store)
    summary = teacher_logits(shards, str(store), weights, views=VIEWS + 2)
    assert summary["views_written"] == 200 * 2
    after = chunk_files(store)
    assert {name: after[name] for name in before} == before  # not rewritten, not even touched
    new = set(after) - set(before)
    assert len(new) == len(ARRAYS) * 8 * 2 and all("/c/" in n for n in new)
    opened = TeacherStore.open(str(store), "train")
    assert opened.num_views == VIEWS + 2 and opened.committed_units() == all_units(shards, VIEWS + 2)
    got, want = arrays(str(store)), arrays(reference)
    for name in ARRAYS:
        assert got[name][:, :VIEWS].tobytes() == want[name].tobytes()
    report = verify_store.run(shards, str(store), weights, units=32, max_views_per_unit=8)
    assert report["digest_match_rate"] == report["top1_match_rate"] == 1.0


def test_views_appended_to_a_store_of_blake2b_digests_keep_blake2b(shards, weights, reference, tmp_path,
                                                                   monkeypatch):
    """A version-2 store, whose provenance names no view digest, was made with blake2b (before crc32 became the
    default): it takes more views as it is, whose digests are blake2b too, and verify-store checks every unit
    with them. Its other arrays are the reference's."""
    store = str(tmp_path / "store")
    monkeypatch.setattr(stage, "VIEW_DIGEST", "blake2b")
    teacher_logits(shards, store, weights)
    monkeypatch.undo()
    group = TeacherStore.open(store, "train", writable=True).group
    provenance = dict(group.attrs["provenance"])
    assert provenance.pop("view_digest") == "blake2b"
    group.attrs.update({"provenance": provenance, "format_version": 2})  # as stores before digests were named
    teacher_logits(shards, store, weights, views=VIEWS + 2)
    assert TeacherStore.open(store, "train").attrs["format_version"] == 2  # grown as it is

    got, want = arrays(store), arrays(reference)
    for name in ARRAYS[:-1]:
        assert got[name][:, :VIEWS].tobytes() == want[name].tobytes(), name
    maker = ViewMaker(ViewRecipe(img_size=IMG), "train")
    for s in range(ShardManifest.load(shards, "train").num_shards):
        samples = list(read_shard(shard_url(shards, "train", s)))
        for v in range(VIEWS + 2):
            halves = maker.shard_views(samples, s, v).images.to(torch.float16).numpy().astype("<f2")
            blake2b = [int.from_bytes(hashlib.blake2b(h.tobytes(), digest_size=4).digest(), "little") for h in halves]
            assert got["digest"][25 * s : 25 * s + 25, v].tolist() == blake2b, (s, v)
    report = verify_store.run(shards, store, weights, units=32, max_views_per_unit=8)
    assert report["digest_match_rate"] == report["top1_match_rate"] == 1.0


def test_a_units_teacher_batches_depend_on_the_unit_alone(shards, weights, tmp_path, monkeypatch):
    """What a unit's views go through (and so the rounding of the teacher's kernels) must not depend on the
    other units a rank runs: its pieces are its cycle cut in BATCH-sized runs, whatever comes before, and the
    teacher scores each piece alone. The units of one shard whose views share a pairing go together: item j
    holds piece j of each, the same positions (a loader decodes each sample once for all of them)."""
    manifest = ShardManifest.load(shards, "train")
    maker = ViewMaker(ViewRecipe(img_size=IMG), "train")
    units = sorted(all_units(shards, VIEWS))
    alone = {u: unit_items(maker, manifest, [u], BATCH) for u in units}
    for (s, v), items in alone.items():
        assert [len(p.positions) for (p,) in items] == [16, 9]  # 25 samples a shard
        assert [pos for (p,) in items for pos in p.positions] == cycle_order(maker, manifest, s, v)
    for some in (units, units[3::2], units[::-1]):
        items = unit_items(maker, manifest, some, BATCH)
        for u in some:
            assert [p for item in items for p in item if (p.shard, p.v) == u] == [p for (p,) in alone[u]]
        for item in items:  # views 0 and 1 share a pairing (pairing_views 3): a shard's units go together
            assert len({(p.shard, p.positions) for p in item}) == 1 and len({p.v for p in item}) == len(item)
        assert len(items) == 2 * len({s for s, _ in some})

    scored = []
    score = stage.teacher_logits
    monkeypatch.setattr(stage, "teacher_logits", lambda model, images, *a: scored.append(len(images)) or score(
        model, images, *a))
    teacher_logits(shards, str(tmp_path / "store"), weights)
    assert sorted(set(scored)) == [9, 16] and scored.count(16) == scored.count(9)  # never two pieces at once


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_writing_at_once_lose_nothing_and_give_the_same_bytes(shards, weights, reference, tmp_path, world):
    store = tmp_path / "store"
    env = {**os.environ, **ONE_THREAD, "WORLD_SIZE": str(world)}
    ranks = [cli(*cli_args(shards, store, weights), env={**env, "RANK": str(r)}) for r in range(world)]
    outs = [p.communicate(timeout=300) for p in ranks]
    assert [p.returncode for p in ranks] == [0] * world, outs
    manifest = ShardManifest.load(shards, "train")
    for r, (out, _) in enumerate(outs):
        mine = range(r, manifest.num_shards, world)
        views = sum(len(manifest.shard_range(s)) for s in mine) * VIEWS
        assert f"wrote {views} views in {len(mine) * VIEWS} units" in out
    assert TeacherStore.open(str(store), "train").committed_units() == all_units(shards, VIEWS)
    assert_same_arrays(str(store), reference)
    assert {n: b for n, (b, _) in chunk_files(store).items()} == {
        n: b for n, (b, _) in chunk_files(Path(reference)).items()
    }


@pytest.mark.slow
def test_ranks_asking_fewer_views_than_the_store_holds_finish_and_change_nothing(shards, weights, reference,
                                                                                tmp_path):
    """--views 1 on a store of 2: rank 0 has nothing to grow, so the other rank must not wait for a layout of 1."""
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    before = chunk_files(store)
    env = {**os.environ, **ONE_THREAD, "WORLD_SIZE": "2"}
    ranks = [cli(*cli_args(shards, store, weights, 1), env={**env, "RANK": str(r)}) for r in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in ranks]  # the waiting rank waited 24 hours
    finally:
        for p in ranks:
            p.kill()
    assert [p.returncode for p in ranks] == [0, 0], outs
    assert all("wrote 0 views in 0 units" in out for out, _ in outs), outs
    assert chunk_files(store) == before


@pytest.mark.slow
def test_sigkilled_run_resumes_and_trusts_only_committed_units(shards, weights, reference, tmp_path):
    store = tmp_path / "store"
    markers = store / "train" / "_commits"
    proc = cli(*cli_args(shards, store, weights), env={**os.environ, **ONE_THREAD})
    deadline = time.monotonic() + 120
    while not _unit_markers(markers):  # kill as soon as the first unit is committed
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = _unit_markers(markers)
    assert 0 < len(committed) < 16

    # A unit whose marker is gone is not trusted, even with its chunks there: spoil them and drop the marker.
    spoiled = sorted(committed)[0]
    shard_index, v = (int(x) for x in spoiled.split("-"))
    spoiled_chunk = store / "train" / "logits" / "c" / str(shard_index) / str(v) / "0"
    spoiled_chunk.write_bytes(b"garbage")
    (markers / spoiled).unlink()
    kept = {n: (markers / n).stat().st_mtime_ns for n in committed - {spoiled}}

    summary = teacher_logits(shards, str(store), weights)
    assert summary["units_written"] == 16 - len(kept)
    assert {n: (markers / n).stat().st_mtime_ns for n in kept} == kept  # committed units are not redone
    assert TeacherStore.open(str(store), "train").committed_units() == all_units(shards, VIEWS)
    assert_same_arrays(str(store), reference)


@pytest.mark.slow
def test_a_second_launch_on_the_store_refuses_in_one_line_and_wipes_nothing(shards, weights, reference, tmp_path):
    """A double-submitted job: the second launch starts once the first has laid out the store and committed a
    unit (a layout made again would wipe it), and refuses; the first completes the reference's store."""
    store = tmp_path / "store"
    first = cli(*cli_args(shards, store, weights), env={**os.environ, **ONE_THREAD})
    deadline = time.monotonic() + 120
    while not _unit_markers(store / "train" / "_commits"):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)  # held still while the second launch starts
    assert (store / "train" / "_lease" / "00000001.json").exists()  # laying out the store wiped nothing there
    second = cli(*cli_args(shards, store, weights), env={**os.environ, **ONE_THREAD})
    _, err = second.communicate(timeout=120)
    first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and "Traceback" not in err, err
    assert err.strip().startswith(f"deit-pipe: error: another launch is writing the teacher store {store} (split "
                                  f"train) (pid {first.pid} on ") and len(err.strip().splitlines()) == 1, err
    assert first.wait(timeout=300) == 0, first.communicate()
    assert TeacherStore.open(str(store), "train").committed_units() == all_units(shards, VIEWS)
    assert_same_arrays(str(store), reference)
    assert [json.loads(p.read_text())["ended"] for p in (store / "train" / "_lease").iterdir()] == [True]


def _unit_markers(markers: Path) -> set[str]:
    names = os.listdir(markers) if markers.is_dir() else []
    return {n for n in names if not n.startswith("layout") and ".tmp-" not in n}


# ------------------------------------------------------------------------------------------- S3


@pytest.mark.slow
def test_store_on_s3(shards, weights, reference, s3_bucket, capsys):
    store = join(s3_bucket, "store")
    proc = cli(*cli_args(shards, store, weights, VIEWS, "--workers", "1"), env={**os.environ, **ONE_THREAD})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    fsspec.filesystem("s3").invalidate_cache()
    assert_same_arrays(store, reference)
    report = verify_store.run(shards, store, weights, units=4, max_views_per_unit=25)
    assert report["digest_match_rate"] == report["top1_match_rate"] == 1.0
    s3 = fsspec.filesystem("s3")
    assert report["store_bytes"] == sum(s3.du(f"{store.removeprefix('s3://')}/train", total=False).values())

    # The student's loader joins the shards with the store on S3 by (idx, v).
    maker = ViewMaker(ViewRecipe(img_size=IMG), "train")
    manifest = ShardManifest.load(shards, "train")
    plan = unit_items(maker, manifest, [(3, 1)], 25, max_items=1)
    _, _, targets = ViewDataset(shards, manifest, maker, plan, store_url=store)[0]
    stored = TeacherStore.open(reference, "train").read_unit(3, 1)
    np.testing.assert_array_equal(targets.topk_classes.numpy(), stored.classes[list(plan[0][0].positions)])

    line = refused(capsys, *cli_args(shards, store, weights, VIEWS, "--seed", "1"))
    assert "recipe.seed is 0 in the store but 1 here" in line
    line = refused(capsys, "verify-store", shards, store)
    assert "teacher.weights_sha256" in line


# ------------------------------------------------------------------------------------- refusals


def test_refusals_name_the_field_that_differs(fmnist_folder, shards, weights, reference, tmp_path, capsys):
    other_shards = shard(fmnist_folder, tmp_path / "other-shards", seed=1)  # same N and S, other samples
    line = refused(capsys, *cli_args(other_shards, reference, weights))
    assert "manifest_digest" in line
    assert "manifest_digest" in refused(capsys, "verify-store", other_shards, reference, "--teacher-weights", weights)

    assert "recipe.img_size is 32 in the store but 64 here" in refused(
        capsys, *[a if a != str(IMG) else "64" for a in cli_args(shards, reference, weights)])
    assert "recipe.seed is 0 in the store but 3 here" in refused(
        capsys, *cli_args(shards, reference, weights, VIEWS, "--seed", "3"))

    assert "teacher.name is 'regnetx_002' in the store but 'regnetx_004' here" in refused(
        capsys, *[a if a != TEACHER else "regnetx_004" for a in cli_args(shards, reference, None)])
    other_weights = make_teacher_weights(tmp_path / "other.safetensors", shards, seed=1)
    assert "teacher.weights_sha256" in refused(capsys, *cli_args(shards, reference, other_weights))
    assert "teacher.weights_sha256" in refused(
        capsys, "verify-store", shards, reference, "--teacher-weights", other_weights)
    assert "teacher.weights_sha256 is" in refused(capsys, "verify-store", shards, reference)  # weights forgotten

    five_classes = make_teacher_weights(tmp_path / "five.safetensors", shards, num_classes=5)
    line = refused(capsys, *cli_args(shards, tmp_path / "new-store", five_classes))
    assert "5 classes" in line and "has 10" in line
    assert "no teacher store" in refused(capsys, "verify-store", shards, tmp_path / "missing")
    assert TeacherStore.open(reference, "train").committed_units() == all_units(shards, VIEWS)  # untouched


@pytest.mark.slow
def test_refusal_from_a_real_process_is_one_line(shards, reference):
    proc = cli(*cli_args(shards, reference, None, VIEWS, "--precision", "bf16"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and "teacher.weights_sha256" in err


def test_the_teacher_runs_in_fp32_unless_asked():
    """A store is paid for once: bf16 flips 1-2% of top-1s on the demo's teacher (bench/teacher_precision.py)."""
    import typer.main

    from deit_pipe.pipeline.cli import app

    command = typer.main.get_command(app).commands["teacher-logits"]
    assert next(p for p in command.params if p.name == "precision").default == "fp32"
    assert stage.TeacherSpec("regnetx_002", None).precision == "fp32"


def test_a_store_in_a_missing_bucket_is_one_line_before_any_work(shards, weights, s3_server, capsys):
    line = refused(capsys, *cli_args(shards, "s3://no-such-bucket-deit-pipe/store", weights))
    assert line.startswith("deit-pipe: error: cannot write to s3://no-such-bucket-deit-pipe/store")
