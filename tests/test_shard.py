"""`deit-pipe shard`: odd inputs locally and on S3, webdataset read-back, real Fashion-MNIST, determinism
over workers / ranks / a SIGKILL and rerun, and one-line CLI errors (DESIGN invariant 1, storage rules)."""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from conftest import ImageFolderSpec, build_odd_image_folder
from PIL import Image

from deit_pipe.distributed.context import RankContext
from deit_pipe.errors import InputError
from deit_pipe.stages import shard as stage
from deit_pipe.storage.location import join, read_bytes
from deit_pipe.storage.manifest import ShardManifest, shard_url
from deit_pipe.storage.shards import ShardSample, encode_shard, read_shard, safe_key, shard_samples

OPTIONS = stage.ShardOptions(samples_per_shard=4, seed=3)
SINGLE = RankContext()  # explicit, so a RANK in the test environment cannot leak in
FORMAT_OF_EXT = {"jpg": "JPEG", "png": "PNG"}


def shard(src, dest, options=OPTIONS, workers=1, ctx=SINGLE):
    return {r.manifest.split: r for r in stage.run(str(src), str(dest), options, workers, ctx)}


def cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deit_pipe.pipeline.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def tree(root: Path) -> dict[str, bytes]:
    """Every file's bytes but the launch lease's (its holder's pid and times differ from run to run)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent.name != "_lease"}


def check_split(dest: str, spec: ImageFolderSpec, split: str, options=OPTIONS) -> ShardManifest:
    """Everything the manifest claims, checked against the shards re-read and the expected verdicts."""
    m = ShardManifest.load(dest, split)
    accepted = spec.accepted(split)
    expect_converted = {p for p, v in accepted.items() if v == "convert"} | {
        p for p in accepted if Path(p).suffix == ".JPEG" and "png_named" in p
    }
    assert m.classes == spec.classes
    assert m.num_samples == len(accepted) and m.samples_per_shard == options.samples_per_shard
    assert m.num_shards == -(-len(accepted) // options.samples_per_shard)
    assert {r["path"] for r in m.rejected} == {p for p, v in spec.verdicts[split].items() if v == "reject"}
    assert all(r["reason"] for r in m.rejected + m.converted)
    assert {c["path"] for c in m.converted} == expect_converted
    assert m.ignored == spec.ignored[split]
    assert m.digest == m.compute_digest()
    key_to_path = {safe_key(p): p for p in accepted}
    seen = []
    for s, info in enumerate(m.shards):
        url = shard_url(dest, split, s)
        data = read_bytes(url)
        assert (info.bytes, info.sha256, info.num_samples) == (len(data), hashlib.sha256(data).hexdigest(),
                                                               len(m.shard_range(s)))
        samples = list(read_shard(url))
        assert [x.idx for x in samples] == list(m.shard_range(s))
        for x in samples:
            path = key_to_path[x.key]
            assert x.label == spec.classes.index(path.split("/")[0])
            img = Image.open(io.BytesIO(x.image))
            assert img.format == FORMAT_OF_EXT[x.ext] and img.mode in ("RGB", "L")
            img.load()
            if options.max_side:
                assert x.ext == "jpg" and max(img.size) <= options.max_side
            elif accepted[path] == "keep":
                assert x.image == (spec.root / split / path).read_bytes()  # copy mode keeps the bytes
            seen.append(path)
    assert sorted(seen) == sorted(accepted)  # every accepted file exactly once
    labels = [spec.classes.index(p.split("/")[0]) for p in seen[: options.samples_per_shard * 2]]
    if split == "train":
        assert len(set(labels)) > 1  # shuffled: the first shards mix classes
    return m


@pytest.fixture(scope="module")
def local_run(odd_image_folder, tmp_path_factory):
    dest = tmp_path_factory.mktemp("shards") / "out"
    return dest, shard(odd_image_folder.root, dest)


def test_odd_inputs_local(odd_image_folder, local_run):
    dest, reports = local_run
    assert set(reports) == {"train", "val"}
    for split in reports:
        check_split(str(dest), odd_image_folder, split)
    assert reports["train"].shards_written == reports["train"].manifest.num_shards
    text = "\n".join(stage.summary(reports["train"]))
    assert "rejected 4" in text and "converted 7" in text and "ignored 4" in text


def test_webdataset_reads_every_accepted_sample_once(odd_image_folder, local_run):
    import webdataset as wds

    dest, reports = local_run
    m = reports["train"].manifest
    urls = [str(dest / "train" / s.name) for s in m.shards]
    key_to_path = {safe_key(p): p for p in odd_image_folder.accepted("train")}
    got = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        path = key_to_path[sample["__key__"]]
        assert path not in got
        got[path] = (int(sample["cls"]), int(sample["idx"]))
        assert ("jpg" in sample) != ("png" in sample)
    assert sorted(got) == sorted(key_to_path.values())
    assert sorted(i for _, i in got.values()) == list(range(m.num_samples))
    for path, (label, _) in got.items():
        assert label == odd_image_folder.classes.index(path.split("/")[0])


def test_rerun_of_a_finished_run_writes_nothing_and_changes_nothing(odd_image_folder, local_run):
    dest, _ = local_run
    before = tree(dest)
    reports = shard(odd_image_folder.root, dest)
    assert all(r.shards_written == 0 for r in reports.values())
    assert tree(dest) == before


@pytest.mark.parametrize("key_chars", [8, 96, 97, 150])  # a member name past 100 characters takes a PAX header
def test_shard_bytes_are_webdataset_tarwriters(key_chars):
    """The tar bytes stores bind (the manifest's sha256s) are what webdataset's TarWriter writes (the shard stage
    used it once; encode_shard lays out tarfile's headers itself): the same members, headers, padding and end of
    archive, images of 0, 512 and 1024 bytes (no padding) among them."""
    import webdataset as wds

    rng = np.random.default_rng(key_chars)
    sizes = [0, 512, 1024, *rng.integers(1, 3000, 9)]
    samples = [ShardSample(key=f"c{i}/" + "k" * (key_chars - 3), idx=i * 997, label=i % 7,
                           image=rng.bytes(int(size)), ext=("png", "jpg", "webp")[i % 3])
               for i, size in enumerate(sizes)]
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0, user="deit-pipe", group="deit-pipe") as tar:
        for x in samples:
            tar.write({"__key__": x.key, x.ext: x.image, "cls": str(x.label).encode(), "idx": str(x.idx).encode()})
    assert encode_shard(samples) == buf.getvalue()


def _tar(samples: list[ShardSample], tar_format: str) -> bytes:
    """The samples' members in a tar: ours (encode_shard), or tarfile's USTAR (a long name split into the prefix
    field) or GNU (a long name in a record of its own) format."""
    if tar_format == "ours":
        return encode_shard(samples)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format={"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT}[
            tar_format]) as tar:
        for x in samples:
            for ext, data in ((x.ext, x.image), ("cls", str(x.label).encode()), ("idx", str(x.idx).encode())):
                member = tarfile.TarInfo(f"{x.key}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return buf.getvalue()


def _as_webdataset_reads(data: bytes) -> list[tuple]:
    """(key, idx, label, image, ext) of each sample as webdataset's own tar stream and grouping read it."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    records = group_by_keys(tar_file_expander([{"url": "shard", "stream": io.BytesIO(data)}]))
    return [(r["__key__"], int(r["idx"]), int(r["cls"]), *next((r[e], e) for e in ("jpg", "png", "webp") if e in r))
            for r in records]


def _some_samples(key_chars: int, n: int = 9) -> list[ShardSample]:
    """Images of 0, 512 and 1024 bytes (no padding after them) among sizes that are not whole blocks."""
    rng = np.random.default_rng(key_chars)
    sizes = [512, 0, 1024, *rng.integers(1, 2000, size=n)]
    return [ShardSample(key=f"c{i}/" + "d" * (key_chars - 70) + "/" + "k" * 60 if key_chars > 100 else f"c{i}/k{i}",
                        idx=i * 31, label=i % 4, image=rng.bytes(int(sizes[i])), ext=("png", "jpg", "webp")[i % 3])
            for i in range(n)]


@pytest.mark.parametrize("tar_format", ["ours", "ustar", "gnu"])
@pytest.mark.parametrize("key_chars", [8, 150])  # ours writes a 150-character name in a PAX record
def test_a_shard_reads_as_webdataset_reads_it_each_image_a_view_into_its_bytes(tar_format, key_chars):
    data = _tar(_some_samples(key_chars), tar_format)
    samples = shard_samples(data)
    assert [(x.key, x.idx, x.label, bytes(x.image), x.ext) for x in samples] == _as_webdataset_reads(data)
    assert all(x.image.obj is data for x in samples)  # nothing copied


def test_a_local_shard_is_mapped_not_read(tmp_path):
    """Its pages are read as a view touches them, and shared with every process that maps the file."""
    path = tmp_path / "train-000000.tar"
    path.write_bytes(encode_shard(_some_samples(8)))
    samples = read_shard(str(path))
    assert [x.idx for x in samples] == [i * 31 for i in range(9)]
    assert all(isinstance(x.image.obj, mmap.mmap) for x in samples)


def _damaged(data: bytes, how: str) -> bytes:
    data = bytearray(data)
    if how == "header":
        data[512 * 2 + 3] ^= 1  # a bit of the second member's name
    elif how == "size":
        data[512 * 2 + 130] = ord("x")  # the second member's size is no number
    elif how == "size past the end":
        data[512 * 2 + 124 : 512 * 2 + 136] = b"77777777777\0"
    elif how == "zeroed header":
        data[512 * 2 : 512 * 3] = bytes(512)  # a reader that stops there loses the samples after it
    elif how == "cut":
        data = data[: len(data) // 2]
    elif how == "not a tar":
        data = bytearray(np.random.default_rng(0).bytes(len(data)))
    return bytes(data)


# What each damage reads as: in a shard this stage wrote, and in a GNU tar with long names (read by tarfile).
DAMAGE_SAYS = {
    "header": ("the tar header at byte 1024 is damaged (shard it again)", "not a readable tar shard (bad checksum)"),
    "size": ("the tar header at byte 1024 is damaged (shard it again)", "not a readable tar shard (bad checksum)"),
    "size past the end": ("the tar header at byte 1024 is damaged (shard it again)",
                          "not a readable tar shard (bad checksum)"),
    "zeroed header": ("the shard's members end at byte 1024, before its data does (damaged: shard it again)",
                      "not a readable tar shard (end of file header)"),
    "cut": ("the shard is cut short at byte", "not a readable tar shard (empty header)"),
    "not a tar": ("the tar header at byte 0 is damaged (shard it again)",) * 2,
}


@pytest.mark.parametrize("how", DAMAGE_SAYS)
@pytest.mark.parametrize("tar_format", ["ours", "gnu"])
def test_a_damaged_shard_is_one_line_not_fewer_samples(tmp_path, how, tar_format):
    """Every sample is there or the read fails, in one line that says what: tarfile (and webdataset's stream over
    it) ends a shard at its first bad header without a word."""
    path = tmp_path / "train-000001.tar"
    path.write_bytes(_damaged(_tar(_some_samples(8 if tar_format == "ours" else 150), tar_format), how))
    with pytest.raises(InputError) as error:
        read_shard(str(path))
    says = DAMAGE_SAYS[how][tar_format == "gnu"]
    assert str(error.value).startswith(f"read {path}: {says}") and "\n" not in str(error.value)


@pytest.mark.parametrize(("members", "says"), [
    ({"png": b"image", "idx": b"0"}, "sample c0/k0 lacks an image, cls or idx member"),
    ({"cls": b"3", "idx": b"zero", "png": b"image"}, "sample c0/k0's idx or cls member is not a number"),
])
def test_a_sample_without_its_class_or_a_number_for_it_is_one_line(tmp_path, members, says):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for ext, data in members.items():
            member = tarfile.TarInfo(f"c0/k0.{ext}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    path = tmp_path / "train-000000.tar"
    path.write_bytes(buf.getvalue())
    with pytest.raises(InputError) as error:
        read_shard(str(path))
    assert str(error.value) == f"read {path}: {says}"


def test_the_shard_stage_does_not_load_torch():
    """torch costs about a second to import, in the command and again in its worker pool; sharding needs none."""
    code = "import sys, deit_pipe.pipeline.cli, deit_pipe.stages.shard; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def _sample_order(seed: int, split: str, n: int) -> list[int]:
    """DESIGN invariant 1 written out: numpy's legacy RandomState stream seeded from SeedSequence(blake2b-128 of
    '["samples",seed,split]'), a stream no numpy upgrade changes."""
    blob = json.dumps(["samples", seed, split], separators=(",", ":")).encode()
    entropy = int.from_bytes(hashlib.blake2b(blob, digest_size=16).digest(), "little")
    return np.random.RandomState(np.random.SeedSequence(entropy).generate_state(4)).permutation(n).tolist()


def _paths_by_idx(dest, m: ShardManifest, spec: ImageFolderSpec) -> list[str]:
    key_to_path = {safe_key(p): p for p in spec.accepted(m.split)}
    samples = [x for s in range(m.num_shards) for x in read_shard(shard_url(str(dest), m.split, s))]
    return [key_to_path[x.key] for x in sorted(samples, key=lambda x: x.idx)]


def test_idx_j_is_the_accepted_file_at_the_seeded_order_j(odd_image_folder, local_run):
    """The accepted files sorted by (class, path), taken in the order drawn under ("samples", seed, split);
    the order is recorded in the work folder."""
    dest, reports = local_run
    for split, report in reports.items():
        accepted = sorted(odd_image_folder.accepted(split), key=lambda p: (p.split("/")[0], p))
        order = _sample_order(OPTIONS.seed, split, len(accepted))
        assert _paths_by_idx(dest, report.manifest, odd_image_folder) == [accepted[j] for j in order]
        assert json.loads((dest / split / "_work" / "order.json").read_bytes()) == order


def test_a_resumed_run_keeps_the_recorded_order_whatever_numpy_draws_now(odd_image_folder, tmp_path, monkeypatch):
    """A run killed after its scan, resumed where the permutation would come out differently (another numpy):
    the shards follow the order the first run recorded, so the two parts of the split agree."""
    dest = tmp_path / "out"
    shard(odd_image_folder.root, dest)
    before = tree(dest)
    for split in ("train", "val"):  # the shards and the manifest never got written; the work folder did
        for path in (dest / split).glob("*.tar"):
            path.unlink()
        for path in (dest / split / "_work" / "shards").iterdir():
            path.unlink()
        (dest / split / "manifest.json").unlink()
    monkeypatch.setattr(stage, "permutation", lambda n, *parts: np.arange(n)[::-1])
    shard(odd_image_folder.root, dest)
    assert tree(dest) == before


def test_a_rerun_removes_what_a_killed_shard_write_left(odd_image_folder, tmp_path):
    """A write killed before its rename leaves `<shard>.tar.tmp-<uuid>` and no marker: the rerun rewrites the
    shard and removes the leftover, ending with the tree of a clean run."""
    dest = tmp_path / "out"
    shard(odd_image_folder.root, dest)
    before = tree(dest)
    (dest / "train" / "train-000000.tar").unlink()
    (dest / "train" / "_work" / "shards" / "train-000000.tar.json").unlink()
    (dest / "train" / "manifest.json").unlink()
    (dest / "train" / "train-000000.tar.tmp-deadbeef").write_bytes(b"half a shard")
    assert shard(odd_image_folder.root, dest)["train"].shards_written == 1
    assert tree(dest) == before


def test_a_dest_of_an_older_plan_format_is_refused(odd_image_folder, tmp_path):
    """A DEST begun by a deit-pipe whose plan format differs (version 1 drew the order with numpy's Generator
    and did not record it) is never finished with this one's order."""
    dest = tmp_path / "out"
    shard(odd_image_folder.root, dest)
    plan_url = dest / "train" / "_work" / "plan.json"
    plan = json.loads(plan_url.read_bytes())
    plan_url.write_text(json.dumps({**plan, "version": 1}))
    with pytest.raises(InputError, match=r"other arguments or another SRC \(plan format 1 -> 2\)"):
        shard(odd_image_folder.root, dest)


def test_pre_resize_and_pixel_limit(odd_image_folder, tmp_path):
    options = stage.ShardOptions(samples_per_shard=5, seed=0, max_side=16, jpeg_quality=75, max_pixels=700)
    reports = shard(odd_image_folder.root, tmp_path, options)
    m = reports["train"].manifest
    too_big = {
        p for p in odd_image_folder.accepted("train")
        if np.prod(Image.open(odd_image_folder.root / "train" / p).size) > 700
    }
    assert too_big  # the limit is tight enough to bite
    bombs = {r["path"] for r in m.rejected if r["reason"].startswith("decompression bomb")}
    assert bombs == too_big | {"cat/bomb.png"}
    assert m.options == {"max_side": 16, "jpeg_quality": 75, "max_pixels": 700}
    for s in range(m.num_shards):
        for x in read_shard(shard_url(str(tmp_path), "train", s)):
            img = Image.open(io.BytesIO(x.image))
            assert x.ext == "jpg" and img.format == "JPEG" and max(img.size) <= 16


def test_odd_inputs_on_s3(odd_image_folder, s3_bucket):
    fs = fsspec.filesystem("s3")
    src, dest = join(s3_bucket, "imagenet"), join(s3_bucket, "shards")
    fs.put(str(odd_image_folder.root) + "/", src.removeprefix("s3://"), recursive=True)
    reports = shard(src, dest)
    for split in ("train", "val"):
        check_split(dest, odd_image_folder, split)
    assert reports["train"].manifest.to_json() == ShardManifest.load(dest, "train").to_json()


@pytest.mark.slow
def test_cli_on_s3_with_workers_matches_local(odd_image_folder, local_run, s3_bucket):
    """Subprocesses (and their forkserver workers) find the endpoint in the environment alone."""
    dest, _ = local_run
    out = join(s3_bucket, "shards")
    result = cli("shard", odd_image_folder.root, out, "--samples-per-shard", "4", "--seed", "3", "--workers", "2")
    assert result.returncode == 0, result.stderr
    fsspec.filesystem("s3").invalidate_cache()
    for split in ("train", "val"):
        assert read_bytes(join(out, split, "manifest.json")) == (dest / split / "manifest.json").read_bytes()


def test_real_fashion_mnist(fmnist_folder, tmp_path):
    reports = shard(fmnist_folder, tmp_path, stage.ShardOptions(samples_per_shard=64))
    train, val = reports["train"].manifest, reports["val"].manifest
    assert (train.num_samples, val.num_samples, train.num_shards) == (200, 50, 4)
    assert len(train.classes) == 10 and not train.rejected and not train.converted
    labels = []
    for s in range(train.num_shards):
        for x in read_shard(shard_url(str(tmp_path), "train", s)):
            assert train.classes[x.label] == x.key.split("/")[0].replace("_5f", "_")
            assert Image.open(io.BytesIO(x.image)).size == (28, 28)
            labels.append(x.label)
    assert np.bincount(labels).tolist() == [20] * 10


def test_one_and_three_workers_give_identical_bytes(odd_image_folder, local_run, tmp_path):
    dest, _ = local_run
    shard(odd_image_folder.root, tmp_path, workers=3)
    assert tree(tmp_path) == tree(dest)


def _fail_or_write_late(path: str) -> int:
    """A unit for the worker pool: the empty path fails at once, any other is written a second later."""
    if not path:
        raise OSError("the unit that fails")
    time.sleep(1.0)
    Path(path).write_text("written after the failure")
    return 1


@pytest.mark.slow
def test_a_failed_unit_stops_the_other_workers_before_the_caller_cleans_up(tmp_path):
    """The workers live for the whole run, so a failure must stop them itself: a worker still busy with another
    unit would otherwise write after the caller removed what the failure left."""
    late = tmp_path / "late"
    pool = stage._WorkerPool(2)
    with pytest.raises(OSError, match="the unit that fails"):
        pool.run(_fail_or_write_late, ["", str(late)], bar=stage._bar("test", 2))
    time.sleep(1.5)
    assert not late.exists()


@pytest.mark.slow
def test_two_ranks_give_the_bytes_of_one(odd_image_folder, local_run, tmp_path):
    dest, _ = local_run
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "deit_pipe.pipeline.cli", "shard", str(odd_image_folder.root), str(tmp_path),
             "--samples-per-shard", "4", "--seed", "3", "--workers", "1"],
            env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outs
    assert tree(tmp_path) == tree(dest)
    # Each rank wrote its own round-robin half of the shards.
    assert "3 written by this run" in outs[0][0] and "3 written by this run" in outs[1][0]


@pytest.fixture
def slow_source(tmp_path) -> tuple[Path, list[str], Path]:
    """(source, shard arguments, the uninterrupted run's DEST): many one-sample shards that each need a resize,
    so a run spends a while committing them."""
    src = tmp_path / "src" / "train"
    rng = np.random.default_rng(5)
    for i in range(240):
        path = src / f"class{i % 3}" / f"img{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    reference = tmp_path / "reference"
    shard(src, reference, stage.ShardOptions(samples_per_shard=1, max_side=32))
    return src, ["--samples-per-shard", "1", "--max-side", "32", "--workers", "1"], reference


def start_and_wait_for_a_commit(src: Path, dest: Path, args: list[str]) -> subprocess.Popen:
    """A `shard` process, once its first shard is committed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "deit_pipe.pipeline.cli", "shard", str(src), str(dest), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while not _committed(dest / "train" / "_work" / "shards"):
        assert proc.poll() is None and time.monotonic() < deadline
    return proc


@pytest.mark.slow
def test_sigkill_midway_then_rerun_matches_an_uninterrupted_run(tmp_path, slow_source):
    src, args, reference = slow_source
    killed = tmp_path / "killed"
    proc = start_and_wait_for_a_commit(src, killed, args)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = _committed(killed / "train" / "_work" / "shards")
    assert 0 < len(committed) < 240 and not (killed / "train" / "manifest.json").exists()
    stamps = {n: (killed / "train" / n).stat().st_mtime_ns for n in committed}

    rerun = cli("shard", src, killed, *args)  # the killed launch's lease is taken over: its process is gone
    assert rerun.returncode == 0, rerun.stderr
    assert f"{240 - len(committed)} written by this run" in rerun.stdout
    assert {n: (killed / "train" / n).stat().st_mtime_ns for n in committed} == stamps  # not redone
    assert tree(killed) == tree(reference)


@pytest.mark.slow
def test_a_second_launch_on_one_dest_refuses_in_one_line_and_the_first_completes_untouched(tmp_path, slow_source):
    src, args, reference = slow_source
    dest = tmp_path / "dest"
    first = start_and_wait_for_a_commit(src, dest, args)
    first.send_signal(signal.SIGSTOP)  # still running (its shards take under a second) when the second starts
    second = cli("shard", src, dest, *args)
    first.send_signal(signal.SIGCONT)
    _one_line_error(second, f"another launch is writing the shards {dest} (pid {first.pid} on ")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert tree(dest) == tree(reference)


def _committed(markers: Path) -> set[str]:
    names = os.listdir(markers) if markers.is_dir() else []
    return {n.removesuffix(".json") for n in names if n.endswith(".tar.json")}


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deit-pipe: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, odd_image_folder, s3_server):
    _one_line_error(cli("shard", tmp_path / "missing", tmp_path / "out"), "does not exist")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    _one_line_error(cli("shard", tmp_path / "flat", tmp_path / "out"), "no class folders")
    bad = build_odd_image_folder(tmp_path / "bad", per_class=1)
    (bad.root / "val" / "zebra").mkdir()
    (bad.root / "val" / "zebra" / "z.png").write_bytes((bad.root / "val" / "cat" / "cat_000.png").read_bytes())
    _one_line_error(cli("shard", bad.root, tmp_path / "out"), "in val but not in train", "zebra")
    (tmp_path / "file").write_bytes(b"")
    _one_line_error(cli("shard", odd_image_folder.root, tmp_path / "file" / "out"), "cannot write to")
    _one_line_error(cli("shard", odd_image_folder.root, "s3://no-such-bucket-deit/out"), "cannot write to")
    # A rerun with other arguments must not mix two runs' outputs.
    first = cli("shard", odd_image_folder.root, tmp_path / "out", "--samples-per-shard", "4", "--workers", "1")
    assert first.returncode == 0, first.stderr
    line = _one_line_error(
        cli("shard", odd_image_folder.root, tmp_path / "out", "--samples-per-shard", "4", "--seed", "9"),
        "other arguments",
    )
    assert "seed 0 -> 9" in line


@pytest.fixture
def two_pngs(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "src" / "train" / "a"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder.parent


RESIZED = stage.ShardOptions(samples_per_shard=2, max_side=16)  # the write decodes and re-encodes every file


def test_a_file_changed_after_its_scan_fails_the_run_with_one_line(two_pngs, tmp_path, monkeypatch):
    scan, victim = stage._scan, two_pngs / "a" / "1.png"

    def scan_then_truncate(*args):
        verdicts = scan(*args)
        victim.write_bytes(victim.read_bytes()[:60])
        return verdicts

    monkeypatch.setattr(stage, "_scan", scan_then_truncate)
    with pytest.raises(InputError, match=r"^a/1\.png changed after it was scanned \(\w+\); rerun in a new DEST$"):
        shard(two_pngs, tmp_path / "out", RESIZED)


def test_a_write_failure_on_a_file_that_still_passes_its_scan_is_not_blamed_on_the_input(two_pngs, tmp_path,
                                                                                          monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug in prepare_image")

    monkeypatch.setattr(stage, "prepare_image", broken)
    with pytest.raises(RuntimeError, match="a bug in prepare_image"):
        shard(two_pngs, tmp_path / "out", RESIZED)


def test_unreadable_source_files_are_rejected_inputs_not_a_failed_run(two_pngs, tmp_path):
    """A dangling symlink and a symlink loop: listed, unreadable, rejected with the reason (no source path in
    it, so the manifest does not depend on where SRC is mounted); the readable files are sharded."""
    os.symlink("/nonexistent-deit-pipe", two_pngs / "a" / "dangling.png")
    os.symlink("loop.png", two_pngs / "a" / "loop.png")
    reports = shard(two_pngs, tmp_path / "out")
    m = reports["train"].manifest
    assert m.num_samples == 2
    assert m.rejected == [
        {"path": "a/dangling.png", "reason": "unreadable: FileNotFoundError: No such file or directory"},
        {"path": "a/loop.png", "reason": "unreadable: OSError: Too many levels of symbolic links"}]


def test_a_full_disk_is_one_line_leaves_no_temporary_file_and_the_rerun_completes(odd_image_folder, local_run,
                                                                                    tmp_path, monkeypatch, capsys):
    """The device fills while the third train shard is written (ENOSPC at its fsync): exit 3 (the machine, not
    the input) with one line; no `.tmp-` file anywhere; after space is freed the rerun ends with a clean run's
    tree."""
    import errno

    from deit_pipe.pipeline.cli import main
    from deit_pipe.storage import location

    fsync, dest = location.os.fsync, tmp_path / "out"

    def full_at_third_shard(fd):
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith("train-000002.tar.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(location.os, "fsync", full_at_third_shard)
    with pytest.raises(SystemExit) as exit_info:
        main(["shard", str(odd_image_folder.root), str(dest), "--samples-per-shard", "4", "--seed", "3",
              "--workers", "1"])
    stderr = capsys.readouterr().err
    err = [line for line in re.split(r"[\r\n]", stderr) if line.startswith("deit-pipe")]  # not the progress bars
    assert exit_info.value.code == 3 and len(err) == 1 and "Traceback" not in stderr, stderr
    assert err[0].startswith("deit-pipe: error: no space left on the device (or the quota) writing ")
    assert "train-000002.tar" in err[0]
    assert err[0].endswith(" bytes): free some space; rerun with the same arguments (committed work is kept)"), err[0]
    assert not [p for p in dest.rglob("*") if ".tmp-" in p.name]
    monkeypatch.setattr(location.os, "fsync", fsync)
    shard(odd_image_folder.root, dest)
    assert tree(dest) == tree(local_run[0])


def test_file_names_with_glob_characters_are_read_as_they_are(two_pngs, tmp_path):
    """`a/1[0].png` beside `a/10.png`: a glob would read the second for the first."""
    folder = two_pngs / "a"
    (folder / "0.png").rename(folder / "1[0].png")
    (folder / "10.png").write_bytes((folder / "1.png").read_bytes())
    m = shard(two_pngs, tmp_path / "out")["train"].manifest
    out = str(tmp_path / "out")
    by_key = {x.key: x.image for s in range(m.num_shards) for x in read_shard(shard_url(out, "train", s))}
    assert by_key[safe_key("a/1[0].png")] == (folder / "1[0].png").read_bytes() != (folder / "10.png").read_bytes()
