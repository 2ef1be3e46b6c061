"""`deit-pipe eval`: an export scores exactly what its training run's last evaluation reported; timm checkpoints
with --model; another --img-size; timm validate.py's transform; refusals in one line; 2 ranks as 1.

Shared setup (module scope): 200 train and 50 val Fashion-MNIST images in 25-sample shards and a short fp32 run of
a tiny distilled DeiT at 32 px (4 epochs, about 15 s) that exports student.safetensors and writes results.json.
Commands that run ranks go through a subprocess, as a user runs them; refusals run in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest
import timm
import torch
from cli_run import one_line_error
from PIL import Image
from timm.data import create_transform, resolve_data_config

from deit_pipe.models.export import export_safetensors
from deit_pipe.models.registry import create_student
from deit_pipe.pipeline.cli import main
from deit_pipe.stages import evaluate

HEADS = ("avg", "cls", "dist")
SCORES = tuple(f"{head}_top{k}" for head in HEADS for k in (1, 5))
TINY_DEIT = ["--model", "deit_tiny_distilled_patch16_224", "--patch-size", "4", "--depth", "2", "--embed-dim", "48",
             "--num-heads", "3"]
# Plain crops and labels: the student learns enough in 4 short epochs that its heads score apart from chance.
RUN = [*TINY_DEIT, "--distillation", "none", "--img-size", "32", "--repeats", "1", "--epochs", "4", "--batch-size",
       "8", "--workers", "0", "--warmup-epochs", "0", "--lr", "0.1",
       "--recipe", '{"auto_augment": null, "reprob": 0, "mix_prob": 0}']
PHOTO = Path(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")  # 512 x 600, a real photo


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`deit-pipe ARGS` in a subprocess (a run's ranks and process group stay out of the test process)."""
    return subprocess.run([sys.executable, "-m", "deit_pipe.pipeline.cli", *args],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)


def cli(*args: str) -> subprocess.CompletedProcess:
    """`run_cli`, which must succeed."""
    proc = run_cli(*args)
    assert proc.returncode == 0, f"deit-pipe {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def train(shards: str, out: Path, *extra: str) -> dict:
    """The run's results.json."""
    cli("train", shards, "-o", str(out), *RUN, *extra)
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def data(fmnist_folder, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    shards = str(root / "shards")
    main(["shard", str(fmnist_folder), shards, "--samples-per-shard", "25", "--workers", "1"])
    run = root / "run"
    return {"root": root, "shards": shards, "run": run, "results": train(shards, run, "--precision", "fp32")}


def printed_scores(stdout: str) -> dict[str, float]:
    """The table's rows ("avg  22.000  70.000") as {"avg_top1": 22.0, ...}."""
    scores = {}
    for line in stdout.splitlines():
        head, *values = line.split()
        if head in HEADS and len(values) == 2:
            scores.update({f"{head}_top1": float(values[0]), f"{head}_top5": float(values[1])})
    return scores


def test_eval_of_an_export_equals_the_last_eval_of_its_training_run(data):
    weights = data["run"] / "student.safetensors"
    proc = cli("eval", data["shards"], str(weights), "--workers", "0")
    final = data["results"]["final"]
    report = json.loads((data["run"] / "student.eval.json").read_text())  # the default: beside the weights
    assert {k: report[k] for k in SCORES} == {k: final[k] for k in SCORES}
    assert printed_scores(proc.stdout) == {k: round(final[k], 3) for k in SCORES}
    assert final["cls_top1"] != final["dist_top1"] or final["cls_top5"] != final["dist_top5"]  # heads told apart
    assert final["avg_top1"] > 15  # learned: a transform that differed from training's would not score the same
    assert report["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (report["model"], report["img_size"], report["crop_pct"], report["pos_grid"]) == (
        "deit_tiny_distilled_patch16_224", 32, None, None)
    assert (report["split"], report["images"], report["ranks"], report["precision"]) == ("val", 50, 1, "fp32")


def test_a_timm_checkpoint_evaluates_with_model_and_is_refused_without_it(data, tmp_path, capsys):
    """A .pth state dict names no architecture; a convnet takes any --img-size as it is, with its own crop_pct."""
    torch.manual_seed(0)
    weights = tmp_path / "regnet.pth"
    torch.save(timm.create_model("regnetx_002", num_classes=10).state_dict(), weights)
    err = one_line_error(capsys, ["eval", data["shards"], str(weights)])
    assert err == f"deit-pipe: error: {weights} does not name its architecture (not a deit-pipe export): pass --model"
    proc = cli("eval", data["shards"], str(weights), "--model", "regnetx_002", "--img-size", "64", "--workers", "0")
    report = json.loads((tmp_path / "regnet.eval.json").read_text())
    assert (report["model"], report["img_size"], report["crop_pct"]) == ("regnetx_002", 64, 0.875)
    assert report["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert set(printed_scores(proc.stdout)) == {"avg_top1", "avg_top5"}  # one head
    assert 0 <= report["avg_top1"] <= report["avg_top5"] <= 100


@pytest.mark.parametrize("kind", ["export", "timm"])
def test_weights_for_another_class_count_are_refused(data, tmp_path, capsys, kind):
    if kind == "export":
        weights, args = tmp_path / "five.safetensors", []
        export_safetensors(create_student("deit_tiny_distilled_patch16_224", 5, img_size=32, patch_size=4, depth=1,
                                          embed_dim=32, num_heads=2), str(weights))
    else:
        weights, args = tmp_path / "imagenet.pth", ["--model", "regnetx_002"]
        torch.save(timm.create_model("regnetx_002").state_dict(), weights)
    err = one_line_error(capsys, ["eval", data["shards"], str(weights), *args])
    classes = "5 classes (head)" if kind == "export" else "1000 classes (head.fc)"
    assert err == f"deit-pipe: error: weights {weights} have {classes}, the data set has 10"


def test_a_damaged_shard_is_one_line_from_a_loader_worker(data, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(data["shards"], shards)
    damaged = shards / "val" / "val-000001.tar"
    tar = bytearray(damaged.read_bytes())
    tar[1024 + 3] ^= 1  # a bit of the second member's name
    damaged.write_bytes(tar)
    # In a process of its own: the error comes after the run's process group is up.
    proc = run_cli("eval", str(shards), str(data["run"] / "student.safetensors"), "--workers", "1", "-o",
                   str(tmp_path / "eval.json"))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"deit-pipe: error: read {damaged}: the tar header at byte 1024 is damaged (shard it again)")


def test_another_img_size_resamples_the_position_grid_and_is_recorded(data, tmp_path):
    """48 px: the export's 8x8 patch grid resampled to 12x12, the images resized at timm's crop_pct for DeiT (0.9)."""
    output = tmp_path / "at48.json"
    proc = cli("eval", data["shards"], str(data["run"] / "student.safetensors"), "--img-size", "48", "--workers", "0",
               "-o", str(output))
    report = json.loads(output.read_text())
    assert (report["img_size"], report["crop_pct"]) == (48, 0.9)
    assert report["pos_grid"] == {"weights": [8, 8], "model": [12, 12]}
    assert "48 px: resize + centre crop, crop_pct 0.9, bicubic" in proc.stdout
    assert set(printed_scores(proc.stdout)) == set(SCORES)


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "vit_tiny_patch16_384"])
def test_the_transform_is_timms_validate_transform(name):
    """On a real photo, what timm's own config and transform make of the model (crop_pct 0.9 for DeiT; 1.0 and
    mean/std 0.5 for the 384 px ViT)."""
    model = timm.create_model(name, pretrained=False)
    timms = create_transform(**resolve_data_config(model=model), is_training=False)
    ours, _ = evaluate.model_transform(model)
    photo = Image.open(PHOTO).convert("RGB")
    assert torch.equal(ours(photo), timms(photo))
    # --crop-pct 0.875 (DeiT's main.py and train's evaluation) is timm's transform with that crop_pct.
    deits = create_transform(**resolve_data_config({"crop_pct": 0.875}, model=model), is_training=False)
    ours, config = evaluate.model_transform(model, crop_pct=0.875)
    assert config["crop_pct"] == 0.875 and torch.equal(ours(photo), deits(photo))
    assert not torch.equal(deits(photo), timms(photo))


@pytest.mark.slow
def test_two_ranks_give_the_numbers_of_one(data, tmp_path):
    """2 val shards over 2 ranks: each scores one, and the counts are summed."""
    output = tmp_path / "two.json"
    proc = cli("eval", data["shards"], str(data["run"] / "student.safetensors"), "--workers", "0", "-o", str(output),
               "--nproc-per-node", "2")
    report = json.loads(output.read_text())
    final = data["results"]["final"]
    assert report["ranks"] == 2
    assert {k: report[k] for k in SCORES} == {k: final[k] for k in SCORES}
    assert printed_scores(proc.stdout) == {k: round(final[k], 3) for k in SCORES}  # printed once, by rank 0


@pytest.mark.slow
def test_bf16_eval_of_a_bf16_runs_export_equals_its_last_eval(data):
    """The export holds the fp32 master weights; --precision bf16 casts them as DeepSpeed's bf16 module has them."""
    run = data["root"] / "run-bf16"
    final = train(data["shards"], run, "--precision", "bf16")["final"]
    cli("eval", data["shards"], str(run / "student.safetensors"), "--precision", "bf16", "--workers", "0")
    report = json.loads((run / "student.eval.json").read_text())
    assert {k: report[k] for k in SCORES} == {k: final[k] for k in SCORES}
