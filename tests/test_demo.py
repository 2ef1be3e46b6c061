"""`deit-pipe demo` end to end at a tiny size: every step through the real CLI (2 ranks, ZeRO-2), the
shards and the teacher store on S3 (moto's server), results and plots written, and a rerun that skips
every finished step.
"""

from __future__ import annotations

import json

import pytest
from evaluation import agree_within_one_image, exported_hits, val_images

from deit_pipe.pipeline import demo
from deit_pipe.storage.location import exists
from deit_pipe.storage.manifest import manifest_url
from deit_pipe.storage.teacher_store import TeacherStore

TINY = demo.DemoConfig(train_images=120, val_images=40, samples_per_shard=30, teacher_epochs=1, student_epochs=1,
                       repeats=1, student=("deit_tiny_distilled_patch16_224", "--patch-size", "8", "--depth", "1",
                                           "--embed-dim", "32", "--num-heads", "2"),
                       batch_size=16, workers=0, fine_tune_epochs=1, teacher_fine_tune_epochs=1, transfer_epochs=1)


@pytest.mark.slow
def test_demo_runs_end_to_end_on_s3_and_a_rerun_skips_every_step(tmp_path, s3_bucket, monkeypatch):
    out = tmp_path / "demo"
    shards, store = f"{s3_bucket}/shards", f"{s3_bucket}/store"
    results = demo.run(str(out), TINY, shards, store)

    assert exists(manifest_url(shards, "train")) and exists(manifest_url(shards, "val"))
    teacher_store = TeacherStore.open(store, "train")
    assert teacher_store.committed_units() == {(s, 0) for s in range(4)}  # 120 images / 30, one view each
    stores = results["stores"]
    assert set(stores) == {"store", "store_fine_tune", "store_digits"}  # no top-2 store without its student
    assert stores["store"]["views"] == stores["store_fine_tune"]["views"] == 120
    assert (stores["store"]["img_size"], stores["store_fine_tune"]["img_size"]) == (32, 40)
    assert (stores["store"]["k"], stores["store"]["code_rank"]) == (10, 10)
    assert stores["store_digits"]["views"] == 1498 and stores["store_digits"]["img_size"] == 40  # 1797 - val 299
    assert set(results["students"]) == set(demo.DemoConfig().students)
    # The fine-tune starts from the best student, at 40 px; the transfers from the fine-tuned one, new heads.
    best = max(results["students"], key=lambda name: results["students"][name]["avg_top1"])
    assert results["best_student"] == best
    fine_tune = json.loads((out / "runs" / "fine_tune" / "results.json").read_text())
    assert fine_tune["config"]["init"] == str(out / "runs" / best / "student.safetensors")
    assert fine_tune["config"]["student"]["depth"] is None  # the architecture came from the export
    for name in ("transfer_none", "transfer_hard"):
        config = json.loads((out / "runs" / name / "results.json").read_text())["config"]
        assert config["init"].endswith("fine_tune/student.safetensors") and config["new_head"]
    # Each reported top-1 (the teacher's; each student's averaged heads and each head) is what the exported
    # weights score on the 40 val images, counted here with timm alone, in fp32 as they ran (on 2 ranks in batches
    # of 16, so rounding may move one near-tie).
    images, labels = val_images(shards, TINY.img_size)
    hits = exported_hits(out / "runs" / "teacher" / "student.safetensors", TINY.teacher, {}, images, labels)
    assert agree_within_one_image(results["teacher"], hits, len(labels)), (results["teacher"], hits)
    # TINY.student's flags as timm's arguments
    overrides = {"img_size": TINY.img_size, **{f[2:].replace("-", "_"): int(x) for f, x in
                                               zip(TINY.student[1::2], TINY.student[2::2], strict=True)}}
    for name in results["students"]:
        hits = exported_hits(out / "runs" / name / "student.safetensors", TINY.student[0], overrides, images, labels)
        assert agree_within_one_image(results["students"][name], hits, len(labels)), (name, results, hits)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    table = (out / "results.md").read_text()
    assert "| hard_online |" in table and "| transfer_hard: " in table
    assert (out / "students_top1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The rerun finds every step's output and starts no command; the results come out the same.
    launched = []
    monkeypatch.setattr(demo, "_cli", lambda *args, **kw: launched.append(args[0]))
    assert demo.run(str(out), TINY, shards, store) == results
    assert launched == []


def test_a_stores_kl_a_rounding_error_below_zero_prints_as_zero():
    """An exact store's mean KL lands a rounding error either side of 0 (the 40 px store's at tau 3: -2e-9 in
    one run): the table says 0.0000, never -0.0000; a KL really below 0 (a bug) still shows its sign."""
    run = {"avg_top1": 50.0, "avg_top5": 90.0, "wall_s": None, "images_per_s": 100.0}
    store = {"img_size": 40, "k": 10, "code_rank": 10, "bytes_per_view": 38.4, "kl_tau1": 3e-6, "kl_tau3": -2e-10}
    results = {"config": {"fine_tune_size": 40, "teacher": "regnetx_002"}, "teacher": run, "students": {"none": run},
               "best_student": "none", "later": dict.fromkeys(demo.LATER_RUNS, run),
               "stores": {"store_fine_tune": store, "store_broken": {**store, "kl_tau1": -0.5}}, "steps_wall_s": 60.0}
    rows = [line for line in demo.results_table(results).splitlines() if line.startswith("| store_")]
    assert rows == ["| store_fine_tune | 40 | 10 | 10 | 38.4 | 0.0000 | 0.0000 |",
                    "| store_broken | 40 | 10 | 10 | 38.4 | -0.5000 | 0.0000 |"]
