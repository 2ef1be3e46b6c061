"""`deit-pipe train`: 2 ranks under ZeRO on CPU (gloo), cached targets equal to the online teacher's,
kill/resume to the same parameters, resume on another world size, ZeRO-3, one-line refusals.

Shared setup (module scope): 200 Fashion-MNIST images in 25-sample shards, a seeded random RegNet teacher
and its store with 6 views (k = 10 = all classes). Students are a tiny DeiT at 32 px.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import safetensors.torch
import torch
from cli_run import one_line_error
from evaluation import agree_within_one_image, exported_hits, val_images

from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.data.schedule import EpochPlan, rank_items
from deit_pipe.data.view_dataset import ViewDataset
from deit_pipe.data.views import ViewMaker
from deit_pipe.loss.teacher_targets import LogitCode, TeacherTargets
from deit_pipe.models.export import export_safetensors
from deit_pipe.models.registry import create_student, create_teacher
from deit_pipe.pipeline.cli import main
from deit_pipe.storage.manifest import ShardManifest, shard_url
from deit_pipe.storage.shards import read_shard
from deit_pipe.storage.teacher_store import TeacherStore

VIEWS = 6
TINY_DEIT = ["--model", "deit_tiny_distilled_patch16_224", "--patch-size", "4", "--depth", "2",
             "--embed-dim", "48", "--num-heads", "3"]
TINY_OVERRIDES = {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 3}
# A learnable setting: lr 0.05 per 512 images is 1.6e-3 at the global batch of 16.
STUDENT = [*TINY_DEIT, "--repeats", "3", "--batch-size", "8", "--workers", "0", "--warmup-epochs", "0",
           "--lr", "0.05"]
REFERENCE = [*STUDENT, "--epochs", "3", "--zero", "2", "--precision", "fp32"]


@pytest.fixture(scope="module")
def data(fmnist_folder, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("train")
    shards, other_shards, store = root / "shards", root / "shards-seed1", root / "store"
    main(["shard", str(fmnist_folder), str(shards), "--samples-per-shard", "25", "--workers", "1"])
    main(["shard", str(fmnist_folder), str(other_shards), "--samples-per-shard", "25", "--workers", "1", "--seed", "1"])
    torch.manual_seed(0)
    teacher, _ = create_teacher("regnetx_002", 10, None)
    weights = root / "teacher.safetensors"
    export_safetensors(teacher, str(weights))
    main(["teacher-logits", str(shards), str(store), "--teacher", "regnetx_002", "--teacher-weights", str(weights),
          "--views", str(VIEWS), "--img-size", "32", "--batch-size", "32", "--workers", "0", "--precision", "fp32"])
    return {"root": str(root), "shards": str(shards), "other_shards": str(other_shards), "store": str(store),
            "weights": str(weights)}


def deit_pipe(*args: str, nproc: int = 2, check: bool = True, timeout: float = 600,
              **popen) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deit_pipe.pipeline.cli", *args] + (["--nproc-per-node", str(nproc)]
                                                                     if nproc > 1 else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **popen)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def train(data: dict, out: Path, *extra: str, nproc: int = 2, shards: str | None = None, store: str | None = None):
    return deit_pipe("train", shards or data["shards"], "-o", str(out), "--logits", store or data["store"],
                     *extra, nproc=nproc)


def rank_states(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank*.json"))]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def exported_digest(out: Path) -> str:
    """sha256 of student.safetensors' tensors in parameter order: the digest the ranks report."""
    tensors = safetensors.torch.load_file(str(out / "student.safetensors"))
    model = create_student("deit_tiny_distilled_patch16_224", 10, img_size=32, patch_size=4, depth=2, embed_dim=48,
                           num_heads=3)
    h = hashlib.sha256()
    for name, _ in model.named_parameters():
        h.update(tensors[name].float().numpy().tobytes())
    return h.hexdigest()


def assert_ranks_agree(out: Path, world: int) -> None:
    states = rank_states(out)
    assert [s["rank"] for s in states] == list(range(world))
    assert len({s["param_sha256"] for s in states}) == 1, "parameters differ between ranks"
    assert len({s["total_steps"] for s in states}) == 1, "ranks took different numbers of steps"


def killed_after_checkpoint(argv: list[str], out: Path, step: int) -> None:
    """Start `deit-pipe ARGV` on 2 ranks and SIGKILL the launcher and both ranks once the checkpoint of `step`
    (or a later one) is in `out`."""
    cmd = [sys.executable, "-m", "deit_pipe.pipeline.cli", *argv, "--nproc-per-node", "2"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, deadline = out / "checkpoints" / "latest", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and int(latest.read_text().strip().removeprefix("global_step") or 0) >= step:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "student.safetensors").exists()


@pytest.fixture(scope="module")
def reference(data) -> Path:
    """An unbroken fp32 ZeRO-2 run on 2 ranks: the one a killed and resumed run must end equal to."""
    out = Path(data["root"]) / "reference"
    train(data, out, *REFERENCE)
    return out


@pytest.fixture(scope="module")
def stopped(data) -> Path:
    """The reference run stopped by --max-steps 13, mid epoch 1 (tests resume copies of it)."""
    out = Path(data["root"]) / "stopped"
    train(data, out, *REFERENCE, "--max-steps", "13")
    return out


# ---------------------------------------------------------------------------------------- fast


def test_cached_targets_equal_the_online_teacher_on_the_same_views(data):
    """The loader's stored targets vs the teacher run on the very batch the loader yields."""
    manifest = ShardManifest.load(data["shards"], "train")
    maker = ViewMaker(ViewRecipe(img_size=32), "train")
    plan = rank_items(maker, manifest, EpochPlan(manifest.num_samples, 3, 3, 1, 16), 0, 0, VIEWS)
    teacher, _ = create_teacher("regnetx_002", 10, data["weights"])
    dataset = ViewDataset(data["shards"], manifest, maker, plan, data["store"])
    for i in (0, len(dataset) - 1):  # a batch spanning views 3.. of epoch 3 (second group)
        pieces, batch, stored = dataset[i]
        assert {p.v for p in pieces} <= {3, 4, 5}
        with torch.inference_mode():
            logits = teacher(batch.images)
        online = TeacherTargets.from_logits(logits, tau=1.0)
        cached = TeacherTargets.from_store(stored, LogitCode.of_store(TeacherStore.open(data["store"], "train")), 1.0)
        assert torch.equal(cached.top1, online.top1)
        # k = all classes: the cached distribution is the teacher's up to fp16 rounding of the logits.
        fp16_step = logits.abs().max().item() * 2.0**-10
        assert torch.allclose(cached.log_probs, online.log_probs, atol=2 * fp16_step + 1e-6)


@pytest.mark.parametrize("nproc", ["0", "2"])
def test_store_of_other_shards_is_refused(data, tmp_path, capsys, nproc):
    err = one_line_error(capsys, ["train", data["other_shards"], "-o", str(tmp_path), "--logits", data["store"],
                                  *REFERENCE, "--nproc-per-node", nproc])
    assert "manifest_digest" in err


def test_conflicting_img_size_is_refused(data, tmp_path, capsys):
    err = one_line_error(capsys, ["train", data["shards"], "-o", str(tmp_path), "--logits", data["store"],
                                  *REFERENCE, "--img-size", "64"])
    assert "--img-size 64 conflicts" in err


def test_an_epoch_smaller_than_one_optimizer_step_is_refused(data, tmp_path, capsys):
    """200 images in 3 views: epoch 2 holds 200 elements, fewer than one step of 2 ranks x 64 x grad-accum 2."""
    argv = ["train", data["shards"], "-o", str(tmp_path), "--logits", data["store"], *REFERENCE, "--batch-size", "64",
            "--grad-accum", "2", "--nproc-per-node", "2"]
    err = one_line_error(capsys, argv)
    assert "holds 198 views, fewer than one optimizer step of 2 ranks x --batch-size 64 x --grad-accum 2" in err


def test_a_fresh_run_in_an_earlier_runs_output_is_refused(data, tmp_path, capsys):
    """Without --resume it would overwrite the earlier run's checkpoints and `latest`."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("global_step12")
    err = one_line_error(capsys, ["train", data["shards"], "-o", str(tmp_path), "--logits", data["store"], *REFERENCE])
    assert "holds an earlier run's checkpoints: pass --resume to continue it, or use another --output" in err


def test_epochs_past_the_stored_views_are_refused(data, tmp_path, capsys):
    argv = ["train", data["shards"], "-o", str(tmp_path), "--logits", data["store"], *STUDENT, "--epochs", "7"]
    err = one_line_error(capsys, argv)
    assert "need 9 views; the store has 6" in err and "--allow-view-reuse" in err


def test_an_exchange_with_micro_batches_smaller_than_r_is_refused(data, tmp_path, capsys):
    """With micro batches smaller than R a team's step can hold fewer samples than the team has ranks (2 ranks at
    batch 1: 2 views, maybe copies of one sample), and a rank would make nothing: refused before any rank starts
    (batch >= R always gives each rank a sample)."""
    argv = ["train", data["shards"], "-o", str(tmp_path), "--logits", data["store"], *REFERENCE, "--batch-size", "2",
            "--exchange", "--nproc-per-node", "2"]
    err = one_line_error(capsys, argv)
    assert "--exchange needs --batch-size 2 of at least --repeats 3" in err


@pytest.mark.slow
def test_refusal_under_the_launcher_is_one_line(data, tmp_path):
    proc = deit_pipe("train", data["shards"], "-o", str(tmp_path), "--logits", data["store"], *STUDENT,
                     "--epochs", "7", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "deit-pipe: error: 7 epochs with --repeats 3 need 9 views; the store has 6 (run `deit-pipe teacher-logits "
        "--views 9` or pass --allow-view-reuse)"
    ]


# ---------------------------------------------------------------------------------------- 2 ranks


@pytest.mark.slow
def test_zero2_two_ranks_learn_and_agree(data, reference):
    rows = metrics(reference)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.05, rows
    steps = [json.loads(line) for line in (reference / "steps.jsonl").read_text().splitlines()]
    assert [s["total_steps"] for s in steps] == list(range(1, rows[-1]["steps"] + 1))
    assert_ranks_agree(reference, 2)
    assert rank_states(reference)[0]["total_steps"] == rows[-1]["steps"]
    assert exported_digest(reference) == rank_states(reference)[0]["param_sha256"]
    # The last eval is what the exported weights score on the 50 val images, counted here with timm alone
    # (fp32; the run's batches of 8 on 2 ranks may round one near-tie the other way).
    images, labels = val_images(data["shards"], 32)
    hits = exported_hits(reference / "student.safetensors", TINY_DEIT[1], TINY_OVERRIDES, images, labels)
    assert agree_within_one_image(rows[-1], hits, len(labels)), (rows[-1], hits)
    assert (reference / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((reference / "run.json").read_text())
    assert config == json.loads((reference / "results.json").read_text())["config"] and config["epochs"] == 3
    # Three epoch-end checkpoints, the newest two kept.
    assert sorted(p.name for p in (reference / "checkpoints").glob("global_step*")) == [
        f"global_step{rows[1]['steps']}", f"global_step{rows[2]['steps']}"]


@pytest.mark.slow
def test_two_tasks_started_by_srun_end_equal_to_torchruns_two_ranks(data, reference, tmp_path):
    """srun starts every rank itself and sets only SLURM_* variables: mapped to torch.distributed's, its two
    tasks train exactly as torchrun's two ranks did (same parameters, same steps)."""
    out = tmp_path / "srun"
    launched = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    base = {k: v for k, v in os.environ.items() if k not in launched and not k.startswith("SLURM_")}
    tasks = [
        subprocess.Popen(
            [sys.executable, "-m", "deit_pipe.pipeline.cli", "train", data["shards"], "-o", str(out), "--logits",
             data["store"], *REFERENCE],
            env={**base, "OMP_NUM_THREADS": "1", "SLURM_PROCID": str(r), "SLURM_STEP_NUM_TASKS": "2",
                 "SLURM_LOCALID": str(r), "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_TASKS_PER_NODE": "2",
                 "SLURM_JOB_ID": str(os.getpid())},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    errors = [task.communicate(timeout=600)[1] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], [e[-3000:] for e in errors]
    assert rank_states(out) == rank_states(reference)


@pytest.mark.slow
def test_a_team_exchange_killed_and_resumed_trains_exactly_as_each_rank_making_its_own_views(data, reference,
                                                                                            tmp_path):
    """--exchange: the 2 ranks (one team, R = 3) each make every copy of half of a step's samples and swap views by
    all_to_all; each still trains on the micro batch it would have made, so a run SIGKILLed mid epoch 1 and
    resumed, both with the exchange, ends bit for bit as the reference (no exchange, unbroken) did."""
    out = tmp_path / "exchange"
    argv = [*REFERENCE, "--checkpoint-every", "2", "--exchange"]
    killed_after_checkpoint(["train", data["shards"], "-o", str(out), "--logits", data["store"], *argv], out, 12)
    train(data, out, *argv, "--resume")
    assert rank_states(out) == rank_states(reference)
    assert exported_digest(out) == exported_digest(reference)


def torchrun_nodes(*args: str, nodes: int = 2) -> None:
    """`args` as `nodes` torchrun "nodes" of one rank each on 127.0.0.1 (c10d rendezvous), as on a cluster."""
    port, run_id = str(20000 + os.getpid() % 20000), f"test-{time.monotonic_ns()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
             "-m", "deit_pipe.pipeline.cli", *args],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(nodes)
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * nodes, [e[-3000:] for e in errors]


@pytest.mark.slow
def test_two_nodes_make_the_stores_bytes_and_train_as_one_node(data, reference, tmp_path):
    """teacher-logits and train on two torchrun nodes of one rank each: the store one process made, byte for
    byte, and the parameters of one node with two ranks."""
    store = tmp_path / "store"
    torchrun_nodes("teacher-logits", data["shards"], str(store), "--teacher", "regnetx_002", "--teacher-weights",
                   data["weights"], "--views", str(VIEWS), "--img-size", "32", "--batch-size", "32", "--workers", "0",
                   "--precision", "fp32")
    for name in ("logits", "classes", "tail_lse", "code", "partner", "lam", "digest"):
        got, want = (TeacherStore.open(s, "train").group[name][:] for s in (str(store), data["store"]))
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name
    out = tmp_path / "two-nodes"
    torchrun_nodes("train", data["shards"], "-o", str(out), "--logits", data["store"], *REFERENCE)
    assert rank_states(out) == rank_states(reference)


@pytest.mark.slow
def test_zero2_bf16_on_s3(data, s3_bucket, tmp_path):
    fs = fsspec.filesystem("s3")
    bucket = s3_bucket.removeprefix("s3://")
    fs.put(data["shards"], f"{bucket}/shards", recursive=True)
    fs.put(data["store"], f"{bucket}/store", recursive=True)
    out = tmp_path / "s3-run"
    train(data, out, *STUDENT, "--epochs", "3", "--zero", "2", "--precision", "bf16",
          shards=f"{s3_bucket}/shards", store=f"{s3_bucket}/store")
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert_ranks_agree(out, 2)


@pytest.mark.slow
def test_stopped_and_resumed_run_ends_equal_to_unbroken(data, reference, stopped, tmp_path):
    out = Path(shutil.copytree(stopped, tmp_path / "resumed"))
    assert not (out / "student.safetensors").exists()
    assert {s["total_steps"] for s in rank_states(out)} == {13}
    train(data, out, *REFERENCE, "--resume")
    assert_ranks_agree(out, 2)
    assert rank_states(out) == rank_states(reference)
    assert exported_digest(out) == exported_digest(reference)


@pytest.mark.slow
def test_a_run_stopped_at_an_epochs_end_records_that_epoch_and_resumes_equal(data, reference, tmp_path):
    """--max-steps landing on an epoch's last step: that epoch's row (loss, eval) is written before the stop,
    and the resumed run writes the others and ends equal to the unbroken one."""
    out = tmp_path / "epoch_end"
    train(data, out, *REFERENCE, "--max-steps", str(metrics(reference)[0]["steps"]))
    assert [row["epoch"] for row in metrics(out)] == [0] and not (out / "results.json").exists()
    died_in_eval = Path(shutil.copytree(out, tmp_path / "died_in_eval"))
    train(data, out, *REFERENCE, "--resume")
    assert [row["epoch"] for row in metrics(out)] == [0, 1, 2]
    assert rank_states(out) == rank_states(reference)
    assert json.loads((out / "results.json").read_text())["completed"]

    # A run that died in epoch 0's evaluation, after the epoch's checkpoint: no row. The resume (still under its
    # --max-steps) walks no step of epoch 0, evaluates its parameters (the reference's scores) and writes the row
    # without a train loss; the next resume trains the rest.
    (died_in_eval / "metrics.jsonl").write_text("")
    train(data, died_in_eval, *REFERENCE, "--max-steps", str(metrics(reference)[0]["steps"]), "--resume")
    rows, expected = metrics(died_in_eval), metrics(reference)
    assert [row["epoch"] for row in rows] == [0] and rows[0]["train_loss"] is None
    scores = {k for k in expected[0] if "_top" in k}
    assert scores and {k: rows[0][k] for k in scores} == {k: expected[0][k] for k in scores}
    train(data, died_in_eval, *REFERENCE, "--resume")
    assert [row["epoch"] for row in metrics(died_in_eval)] == [0, 1, 2]
    assert rank_states(died_in_eval) == rank_states(reference)


@pytest.mark.slow
def test_a_resume_already_at_its_max_steps_trains_nothing(data, stopped, tmp_path):
    out = Path(shutil.copytree(stopped, tmp_path / "again"))
    before = rank_states(out)
    train(data, out, *REFERENCE, "--max-steps", "13", "--resume")
    assert rank_states(out) == before and {s["total_steps"] for s in before} == {13}


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_unbroken_parameters(data, reference, tmp_path):
    out = tmp_path / "killed"
    killed_after_checkpoint(["train", data["shards"], "-o", str(out), "--logits", data["store"], *REFERENCE,
                             "--checkpoint-every", "2"], out, 12)  # mid epoch 1
    train(data, out, *REFERENCE, "--checkpoint-every", "2", "--resume")
    assert rank_states(out) == rank_states(reference)
    assert exported_digest(out) == exported_digest(reference)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (/proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_the_ranks_of_a_sigkilled_launcher_end_with_it(data, tmp_path):
    """--nproc-per-node runs torchrun inside the deit-pipe process, and torchrun puts each rank in a session of its
    own: a SIGKILL of the launcher (a scheduler's, a test's timeout) must not leave the ranks training."""
    cmd = [sys.executable, "-m", "deit_pipe.pipeline.cli", "train", data["shards"], "-o", str(tmp_path / "run"),
           "--logits", data["store"], *STUDENT, "--epochs", "60", "--allow-view-reuse", "--zero", "0", "--precision",
           "fp32", "--nproc-per-node", "2"]
    with subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True) as launcher:
        deadline = time.monotonic() + 120
        while len(ranks := _children(launcher.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(ranks) == 2, "the ranks did not start"
        while not (tmp_path / "run" / "run.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # the ranks are at work
        os.kill(launcher.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(map(_running, ranks)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in ranks if _running(pid)]
    for pid in left:  # not to the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not left, "ranks outlived their launcher"


@pytest.mark.slow
def test_a_second_launch_into_one_output_refuses_in_one_line_and_the_first_ends_unbroken(data, stopped, tmp_path):
    """A double-submitted job: the second launch starts while the first holds --output (its ranks stopped there),
    and refuses; the first, continued, ends with the unbroken run's parameters."""
    out = tmp_path / "out"
    argv = ["train", data["shards"], "-o", str(out), "--logits", data["store"], *REFERENCE, "--max-steps", "13"]
    first = subprocess.Popen([sys.executable, "-m", "deit_pipe.pipeline.cli", *argv, "--nproc-per-node", "2"],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.glob("_lease/*.json")):
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.02)
    holder = json.loads(next(out.glob("_lease/*.json")).read_text())["pid"]
    os.killpg(first.pid, signal.SIGSTOP)
    second = deit_pipe(*argv, check=False)
    os.killpg(first.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("deit-pipe")]
    assert errors and all(line.startswith(f"deit-pipe: error: rank 0: another launch is writing the run {out} (pid "
                                          f"{holder} on ") for line in errors), second.stderr[-3000:]
    assert first.wait(timeout=600) == 0
    assert rank_states(out) == rank_states(stopped)


@pytest.mark.slow
def test_a_run_returns_with_no_loader_worker_left_running(data, tmp_path):
    """A process that goes on after a run (a sweep, the benchmark) keeps none of its persistent loader workers:
    forked into its next loader's workers, they were what hung the first GPU benchmark at exit."""
    argv = ["train", data["shards"], "-o", str(tmp_path), "--logits", data["store"], *STUDENT, "--workers", "1",
            "--epochs", "1", "--zero", "0", "--precision", "fp32"]
    code = textwrap.dedent(f"""
        import multiprocessing
        from deit_pipe.pipeline.cli import main
        try:
            main({argv!r})
        except SystemExit as exit_:
            assert not exit_.code, exit_.code
        print("children", len(multiprocessing.active_children()))
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "children 0"


@pytest.mark.slow
def test_resume_on_one_rank_from_a_two_rank_checkpoint(data, stopped, tmp_path):
    """2 ranks stop mid epoch 1; 1 rank continues through DeepSpeed's universal checkpoint to the end."""
    out = Path(shutil.copytree(stopped, tmp_path / "rescaled"))
    train(data, out, *REFERENCE, "--resume", "--keep-checkpoints", "0", nproc=1)  # keep the universal copy to see
    assert (out / "checkpoints" / "global_step13_universal").is_dir()
    assert [r["epoch"] for r in metrics(out)] == [0, 1, 2]
    (state,) = rank_states(out)
    assert state["world_size"] == 1
    # 200 samples, R = 3: epoch 0 holds 66 x 3 = 198 views, 12 steps of 2 x 8; the stop at 13 is 1 step into epoch 1.
    # 1 step of 16 samples before, so 16 / 8 = step 2 of the 1-rank plan; the 1-rank plan then runs the
    # rest of epoch 1 and all of epoch 2.
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    resumed = steps[13]
    assert (resumed["epoch"], resumed["step"]) == (1, 2)
    assert steps[-1]["epoch"] == 2 and state["total_steps"] == steps[-1]["total_steps"]
    assert json.loads((out / "results.json").read_text())["completed"]
    assert exported_digest(out) == state["param_sha256"]


@pytest.mark.slow
def test_zero3_two_ranks_with_online_teacher_eval_digest_and_export(data, tmp_path):
    """ZeRO-3 serves everything here: the online teacher, eval of each head, the digest and the export.
    Parameter persistence is off so every parameter really is partitioned (tiny models stay whole otherwise)."""
    ds_config = tmp_path / "zero3.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    out = tmp_path / "zero3"
    deit_pipe("train", data["shards"], "-o", str(out), "--teacher-online", "regnetx_002", "--teacher-weights",
              data["weights"], "--img-size", "32", *STUDENT, "--epochs", "2", "--zero", "3", "--precision", "fp32",
              "--ds-config", str(ds_config))
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert {"avg_top1", "cls_top1", "dist_top1"} <= set(rows[-1])
    assert_ranks_agree(out, 2)
    assert exported_digest(out) == rank_states(out)[0]["param_sha256"]
    assert np.isfinite(rows[-1]["train_loss"])


@pytest.mark.slow
def test_zero3_eval_with_unequal_val_shards_per_rank_finishes(data, tmp_path):
    """ImageNet's 50 val shards over 8 or 16 ranks give ranks unequal eval work; under ZeRO-3 every forward
    gathers parameters from all ranks, so a rank that ran out of batches left the others waiting forever.
    Here 3 ranks share 2 val shards (one rank has none); the eval still counts each val image once."""
    out = tmp_path / "zero3"
    train_args = ("train", data["shards"], "-o", str(out), "--logits", data["store"], *STUDENT, "--epochs", "1",
                  "--zero", "3", "--precision", "fp32")
    deit_pipe(*train_args, nproc=3, timeout=300)
    row = metrics(out)[-1]
    images, labels = val_images(data["shards"], 32)
    hits = exported_hits(out / "student.safetensors", TINY_DEIT[1], TINY_OVERRIDES, images, labels)
    assert agree_within_one_image(row, hits, len(labels)), (row, hits)


@pytest.mark.slow
def test_a_run_prints_its_progress_and_results_and_nothing_else(data, tmp_path, monkeypatch):
    """No DeepSpeed op-build or checkpoint-conversion lines, no "No CUDA runtime is found" on a CPU: stdout is the
    final row, stderr the progress bars and real warnings (timm's: one epoch leaves its cosine nothing to do).
    And no C++ op built at all into a fresh extension cache (the shared-memory all-reduce DeepSpeed's CPU backend
    builds at its first start serves only its inference)."""
    extensions = tmp_path / "torch-extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    proc = deit_pipe("train", data["shards"], "-o", str(tmp_path / "run"), "--logits", data["store"], *STUDENT,
                     "--epochs", "1", "--zero", "2", "--precision", "fp32")
    assert not extensions.exists(), [p.name for p in extensions.iterdir()]
    assert [json.loads(line)["epoch"] for line in proc.stdout.splitlines()] == [0]
    progress = re.compile(r"\d+/\d+ \[|%\|")
    rest = [line for line in re.split(r"[\r\n]", proc.stderr) if line.strip() and not progress.search(line)]
    assert all(line.startswith("Cosine annealing scheduler will have no effect") for line in rest), rest


def test_a_store_of_blake2b_digests_trains(data, tmp_path):
    """A version-2 store (before digests were named: blake2b-32 of each view's float16 pixels) still joins its
    views: the loader digests with the store's function, not today's default."""
    store = tmp_path / "store-v2"
    shutil.copytree(data["store"], store)
    opened = TeacherStore.open(str(store), "train", writable=True)
    provenance = dict(opened.attrs["provenance"])
    maker = ViewMaker(ViewRecipe.from_dict(provenance.pop("recipe")), "train")
    manifest = ShardManifest.load(data["shards"], "train")
    digest = opened.group["digest"]
    for s in range(manifest.num_shards):
        samples = list(read_shard(shard_url(data["shards"], "train", s)))
        rows = manifest.shard_range(s)
        for v in range(VIEWS):
            halves = maker.shard_views(samples, s, v).images.to(torch.float16).numpy().astype("<f2")
            digest[rows.start : rows.stop, v] = np.array(
                [int.from_bytes(hashlib.blake2b(h.tobytes(), digest_size=4).digest(), "little") for h in halves],
                dtype=np.uint32)
    provenance = dict(opened.attrs["provenance"])
    del provenance["view_digest"]
    opened.group.attrs.update({"provenance": provenance, "format_version": 2})
    proc = train(data, tmp_path / "run", *STUDENT, "--epochs", "1", "--max-steps", "2", nproc=1, store=str(store))
    assert proc.returncode == 0 and "replay drift" not in proc.stderr  # train() also raises on a failed run


@pytest.mark.slow
def test_batch_norm_student_trains_in_bf16(data, tmp_path):
    """DeepSpeed's bf16 leaves buffers in fp32; a RegNet's batch norm must still run (and learn)."""
    out = tmp_path / "regnet-bf16"
    deit_pipe("train", data["shards"], "-o", str(out), "--model", "regnetx_002", "--distillation", "none",
              "--img-size", "32", "--repeats", "1", "--epochs", "2", "--batch-size", "16", "--workers", "0",
              "--warmup-epochs", "0", "--lr", "0.05", "--zero", "1", "--precision", "bf16", nproc=1)
    rows = metrics(out)
    assert len(rows) == 2 and all(np.isfinite(r["train_loss"]) for r in rows)
    assert (out / "student.safetensors").exists()


@pytest.mark.slow
def test_replay_drift_inside_the_ranks_is_one_line_per_rank(data, tmp_path):
    """A store whose pixel digests no longer match the views rebuilt here: the loader workers of each rank
    refuse it, and neither DataLoader's nor torchrun's traceback reaches the user."""
    import zarr

    store = tmp_path / "store"
    shutil.copytree(data["store"], store)
    zarr.open_group(str(store / "train"), mode="r+")["digest"][:, :] = 12345
    proc = deit_pipe("train", data["shards"], "-o", str(tmp_path / "run"), "--logits", str(store),
                     *STUDENT, "--workers", "1",  # the later --workers wins: the error rises in a loader worker
                     "--epochs", "3", "--max-steps", "2", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("deit-pipe: error:")]
    assert proc.returncode == 2
    assert len(errors) == 2 and all("replay drift" in line for line in errors)
    assert {line.split(": ")[2] for line in errors} == {"rank 0", "rank 1"}  # each line says whose it is
    assert "Traceback" not in proc.stderr


# ---- one step, in process --------------------------------------------------------------------------


class _RecordingEngine:
    """DeepSpeed's engine surface that train_step uses, around a real timm DeiT: forward, backward, step."""

    def __init__(self, module):
        self.module, self.backward_losses, self.steps = module, [], 0

    def __call__(self, images):
        return self.module(images)

    def backward(self, loss):
        self.backward_losses.append(loss)

    def step(self):
        self.steps += 1


@pytest.mark.parametrize("distillation", ["hard", "soft"])
def test_a_train_step_is_deits_loss_on_mixed_smoothed_labels(distillation):
    """StudentRun.train_step on one batch equals DeiT's loss written out: SoftTargetCrossEntropy of the class
    head on lam * smooth(label) + (1 - lam) * smooth(partner label) (timm's mixup_target of the flipped batch,
    smoothing 0.1), plus the teacher's term on the distillation head, alpha 0.5 (DeiT losses.py)."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from timm.data.mixup import mixup_target

    from deit_pipe.data.views import ViewBatch
    from deit_pipe.loss.deit import DistillationLoss
    from deit_pipe.optim.schedule import LRSchedule
    from deit_pipe.stages.train import StudentRun, TrainConfig

    torch.manual_seed(0)
    student = create_student("deit_tiny_distilled_patch16_224", 10, img_size=32, patch_size=8, depth=1,
                             embed_dim=32, num_heads=2, drop_path_rate=0.0)
    student.set_distilled_training(True)
    n, lam, tau = 4, 0.7, 3.0 if distillation == "soft" else 1.0
    label = torch.tensor([1, 4, 4, 9])
    batch = ViewBatch(idx=torch.arange(n), v=torch.zeros(n, dtype=torch.int64),
                      images=torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2)), label=label,
                      partner=torch.arange(n).flip(0), partner_label=label.flip(0), lam=torch.full((n,), lam),
                      digest=torch.zeros(n, dtype=torch.int64))
    teacher_logits = torch.randn(n, 10, generator=torch.Generator().manual_seed(3))
    cfg = TrainConfig(shards="unused", output="unused", distillation=distillation, tau=tau, seed=5,
                      schedule=LRSchedule(epochs=10))
    positions = []
    run = SimpleNamespace(
        cfg=cfg, ctx=SimpleNamespace(rank=0), device=torch.device("cpu"), dtype=torch.float32, num_classes=10,
        recipe=ViewRecipe(img_size=32), engine=_RecordingEngine(student),
        lr_scheduler=SimpleNamespace(step=positions.append),
        criterion=DistillationLoss(distillation, 0.5, tau, "sum_numel"),
        teacher=lambda images, stored: TeacherTargets.from_logits(teacher_logits, tau),
    )
    loss = StudentRun.train_step(run, batch, None, epoch=2, step=1, steps=4)
    assert loss.shape == () and not loss.requires_grad  # still a tensor: read later, in one sync per many steps

    with torch.no_grad():
        cls_logits, dist_logits = student(batch.images)
    targets = mixup_target(label, 10, lam=lam, smoothing=0.1)
    base = torch.sum(-targets * F.log_softmax(cls_logits, dim=-1), dim=-1).mean()
    if distillation == "hard":
        distill = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
    else:  # DeiT: kl_div(log_softmax(s / T), log_softmax(t / T), sum, log_target) * T * T / numel
        p_t = F.softmax(teacher_logits / tau, dim=1)
        kl = (p_t * (F.log_softmax(teacher_logits / tau, dim=1) - F.log_softmax(dist_logits / tau, dim=1))).sum()
        distill = kl * tau * tau / dist_logits.numel()
    assert loss.item() == pytest.approx((0.5 * base + 0.5 * distill).item(), rel=1e-5)
    assert run.engine.steps == 1 and len(run.engine.backward_losses) == 1
    assert positions == [1]  # DeiT steps the cosine after each epoch: epoch 2 trains at its value at 1


# ---------------------------------------------------------------------------------------- --init


def test_a_storage_fault_in_train_advises_a_rerun_with_resume(data, tmp_path, capsys, monkeypatch):
    """A rerun of train without --resume is refused once a checkpoint exists, so the one line advises --resume
    (with it, a run with no checkpoint starts from scratch)."""
    import errno

    from deit_pipe.stages import train as train_stage
    from deit_pipe.storage.location import storage_errors

    def failing_disk(*args):
        with storage_errors("read", data["shards"]):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(train_stage.ShardManifest, "load", failing_disk)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", data["shards"], "-o", str(tmp_path), "--logits", data["store"], *REFERENCE])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 3 and len(err) == 1, err
    assert err[0] == (f"deit-pipe: error: read {data['shards']} failed (OSError: [Errno 5] Input/output error), "
                      f"also on retrying; rerun with the same arguments and --resume (it continues from the last "
                      f"checkpoint)")


def test_bad_init_weights_are_refused_in_one_line(data, tmp_path, capsys):
    """Missing, another architecture, a pickle that would run code: refused before any rank starts."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "payload-ran"), "w"))

    (tmp_path / "malicious.pth").write_bytes(pickle.dumps({"model": Payload()}))
    argv = ["train", data["shards"], "-o", str(tmp_path / "run"), "--logits", data["store"], *REFERENCE]
    assert "weights file not found" in one_line_error(capsys, [*argv, "--init", str(tmp_path / "missing.pth")])
    assert one_line_error(capsys, [*argv, "--init", data["weights"]]).endswith(
        f"--init weights {data['weights']} are for regnetx_002, not deit_tiny_distilled_patch16_224")
    assert "not a checkpoint a weights-only load can read" in one_line_error(
        capsys, [*argv, "--init", str(tmp_path / "malicious.pth")])
    assert not (tmp_path / "payload-ran").exists()


FINE_TUNE = ["--distillation", "none", "--img-size", "48", "--repeats", "3", "--batch-size", "8", "--workers", "0",
             "--warmup-epochs", "0", "--lr", "0.01", "--min-lr", "0.01", "--weight-decay", "1e-8", "--epochs", "2",
             "--zero", "2", "--precision", "fp32", "--checkpoint-every", "2"]


@pytest.mark.slow
def test_a_fine_tune_at_48px_resumes_after_sigkill_bit_identically(data, reference, tmp_path):
    """DeiT's fine-tune recipe shape (constant lr, weight decay 1e-8) at 48 px from the 32 px reference export,
    the architecture taken from the export; killed mid run and resumed, it ends equal to the unbroken fine-tune."""
    init = str(reference / "student.safetensors")
    argv = ["train", data["shards"], "--model", "deit_tiny_distilled_patch16_224", "--init", init, *FINE_TUNE]
    unbroken = tmp_path / "unbroken"
    proc = deit_pipe(*argv, "-o", str(unbroken))
    assert f"--init {init}: position embeddings resampled from a 8x8 to a 12x12 patch grid (timm)" in proc.stdout
    result = json.loads((unbroken / "results.json").read_text())
    assert result["init_sha256"] == hashlib.sha256(Path(init).read_bytes()).hexdigest()

    out = tmp_path / "killed"
    killed_after_checkpoint([*argv, "-o", str(out)], out, 8)
    deit_pipe(*argv, "-o", str(out), "--resume")
    assert_ranks_agree(out, 2)
    assert rank_states(out) == rank_states(unbroken)
    assert (safetensors.torch.load_file(str(out / "student.safetensors")).keys()
            == safetensors.torch.load_file(str(unbroken / "student.safetensors")).keys())
    assert (out / "student.safetensors").read_bytes() == (unbroken / "student.safetensors").read_bytes()


@pytest.mark.slow
def test_a_transfer_from_10_to_5_classes_gets_fresh_heads_and_trains(data, reference, fmnist_folder, tmp_path):
    five = tmp_path / "five-classes"
    for split in ("train", "val"):
        for folder in sorted((fmnist_folder / split).iterdir())[:5]:
            shutil.copytree(folder, five / split / folder.name)
    shards = tmp_path / "shards5"
    main(["shard", str(five), str(shards), "--samples-per-shard", "25", "--workers", "1"])
    init = str(reference / "student.safetensors")
    out = tmp_path / "transfer"
    proc = deit_pipe("train", str(shards), "-o", str(out), "--init", init, *FINE_TUNE, "--img-size", "32",
                     "--lr", "0.05", "--min-lr", "0.05", "--epochs", "3")
    assert f"--init {init}: new head and head_dist for 5 classes" in proc.stdout
    assert "resampled" not in proc.stdout
    student = safetensors.torch.load_file(str(out / "student.safetensors"))
    assert student["head.weight"].shape == student["head_dist.weight"].shape == (5, 48)
    # It trained from the init: every backbone tensor moved (AdamW steps), and 3 epochs were evaluated.
    start = safetensors.torch.load_file(init)
    assert all(not torch.equal(student[k], start[k]) for k in ("patch_embed.proj.weight", "pos_embed",
                                                                 "blocks.1.mlp.fc2.weight"))
    assert [row["epoch"] for row in metrics(out)] == [0, 1, 2]
