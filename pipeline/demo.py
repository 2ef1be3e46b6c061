"""`deit-pipe demo`: the whole pipeline on Fashion-MNIST, end to end, in one command, then the rest of DeiT.

ImageFolder -> shards -> a small RegNet teacher trained by our own train stage on a teacher's recipe (plain
crops, no mixing: DeiT's RegNet was trained apart from the student) -> the teacher store -> the same small
DeiT student several ways (no distillation; hard and soft from the store; hard with the online teacher; with
--full, on all 70,000 images, also soft online and soft from a top-2 store without a code, which makes a poor
tail's cost visible), each under DeepSpeed ZeRO-2 on 2 local ranks. Then DeiT's "up-arrow": the best student fine-tuned
at a higher resolution, distilled from a second store the same teacher made at that resolution; and a
transfer to real handwritten digits (scikit-learn's), from the fine-tuned student with a new data set's
shards, with and without distillation from a store made on the digits by the teacher fine-tuned on them.
Every step runs the real CLI in a subprocess, exactly as a user would, and is skipped when its output already
exists, so a rerun picks up where the last one stopped (a training run cut short resumes from its last
checkpoint). The results table (markdown + JSON) and plots land in OUT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from deit_pipe.pipeline import digits
from deit_pipe.pipeline.fashion_mnist import write_image_folder
from deit_pipe.reporting.plots import plot_curves, read_jsonl
from deit_pipe.storage.location import exists, join
from deit_pipe.storage.manifest import manifest_url

# The teacher learns on plain crops, as a RegNet is trained (no RandAugment, erasing or mixing); the students
# use DeiT's full recipe.
TEACHER_RECIPE = ('{"auto_augment": null, "reprob": 0, "scale": [0.5, 1], "color_jitter": 0, "mixup_alpha": 0, '
                  '"cutmix_alpha": 0}')


@dataclass(frozen=True)
class DemoConfig:
    train_images: int = 10000
    val_images: int = 2000
    samples_per_shard: int = 250
    img_size: int = 32
    teacher: str = "regnetx_002"
    teacher_epochs: int = 12
    teacher_lr: float = 1e-2
    teacher_recipe: str = TEACHER_RECIPE
    student_epochs: int = 6
    repeats: int = 3
    student: tuple = ("deit_tiny_distilled_patch16_224", "--patch-size", "4", "--depth", "4", "--embed-dim", "64",
                      "--num-heads", "4")
    students: tuple = ("none", "hard_store", "soft_store", "hard_online")
    batch_size: int = 64  # per rank
    # Per 512 images; small data and few epochs want a larger rate than ImageNet's 5e-4. Of 4e-3, 8e-3 and
    # 1.5e-2 (6 epochs, this config), 8e-3 gives the student without distillation its best top-1.
    lr: float = 8e-3
    # DeiT's fine-tuning at a higher resolution (README: --lr 5e-6 --min-lr 5e-6 --weight-decay 1e-8, 30 epochs):
    # a constant rate, a hundredth of training's, here for one epoch (the demo's 20 minutes); the teacher first
    # gets two epochs at that size.
    fine_tune_size: int = 40
    fine_tune_epochs: int = 1
    fine_tune_lr: float = 8e-5
    teacher_fine_tune_epochs: int = 2
    # Transfer to the digits at the fine-tuned size (the recipe resizes the 8x8 images to it); 1,498 images want
    # small batches to take a few hundred steps.
    transfer_epochs: int = 5
    transfer_lr: float = 1e-2
    transfer_batch_size: int = 16
    ranks: int = 2
    workers: int = 1
    store_workers: int = 2  # teacher-logits' loader processes: they, not the small teacher, set its pace
    seed: int = 0

    @classmethod
    def full(cls) -> DemoConfig:
        # All the images and all six students, sized to run in the background of one working session on 2 cores
        # (45 minutes here): the Fashion-MNIST teachers and students walk 3x the demo's samples, the fine-tune 6x,
        # the digit runs as in the demo.
        return cls(train_images=60000, val_images=10000, samples_per_shard=1000, teacher_epochs=6,
                   student_epochs=3, students=tuple(STUDENT_RUNS), teacher_fine_tune_epochs=1)


STUDENT_RUNS = {
    # name: (distillation, teacher source)
    "none": ("none", None),
    "hard_store": ("hard", "store"),
    "soft_store": ("soft", "store"),
    "hard_online": ("hard", "online"),
    "soft_online": ("soft", "online"),
    "soft_store_k2": ("soft", "store_k2"),
}
POOR_STORE = ["--topk", "2", "--code-rank", "0"]  # the tail takes the mean logits' shape


def _cli(*args: str, ranks: int = 1) -> None:
    """Run one deit-pipe command as a user would; ranks > 1 starts them through --nproc-per-node."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    cmd = [sys.executable, "-m", "deit_pipe.pipeline.cli", *args]
    if ranks > 1:
        cmd += ["--nproc-per-node", str(ranks)]
    print("$ deit-pipe " + " ".join(args[:2]) + " ...", flush=True)
    subprocess.run(cmd, env=env, check=True)


def _wall_time_file(out: str, step: str) -> str:
    return os.path.join(out, "steps", step + ".wall_s")


def _unless_done(out: str, step: str, done: str, args: list[str], ranks: int = 1, mark_done: bool = False) -> None:
    """Run deit-pipe `args` unless the step's output `done` (any URL) exists; keep its wall time for the table.
    With mark_done, `done` is a local marker written once the command returned (for outputs that can exist
    half made)."""
    if exists(done):
        return
    t0 = time.time()
    _cli(*args, ranks=ranks)
    if mark_done:
        open(done, "w").close()
    with open(_wall_time_file(out, step), "w") as f:
        f.write(str(time.time() - t0))


def run(out: str, cfg: DemoConfig, shards: str | None = None, store: str | None = None) -> dict:
    """OUT is a local folder (images, runs, results); shards and store default to it, or any fsspec URL."""
    os.makedirs(os.path.join(out, "steps"), exist_ok=True)
    runs = join(out, "runs")
    shards, store = shards or join(out, "shards"), store or join(out, "teacher-store")
    stores = {"store": store, "store_k2": store.rstrip("/") + "-k2",
              "store_fine_tune": f"{store.rstrip('/')}-{cfg.fine_tune_size}px",
              "store_digits": store.rstrip("/") + "-digits"}
    digit_shards = shards.rstrip("/") + "-digits"
    def weights(run_name: str) -> str:
        return join(runs, run_name, "student.safetensors")

    def train(name: str, data: str, *args: str, batch_size: int = cfg.batch_size) -> None:
        _unless_done(out, name, join(runs, name, "results.json"), [
            "train", data, "-o", join(runs, name), "--resume", *args, "--batch-size", str(batch_size), "--workers",
            str(cfg.workers), "--zero", "2", "--seed", str(cfg.seed)], ranks=cfg.ranks)

    def train_teacher(name: str, data: str, img_size: int, epochs: int, lr: float, warmup: int, *args: str,
                      batch_size: int = cfg.batch_size) -> None:
        # fp32: bf16 buys a net this small no speed on a CPU, and fp32 keeps the teacher exact.
        train(name, data, "--model", cfg.teacher, "--distillation", "none", "--img-size", str(img_size),
              "--epochs", str(epochs), "--repeats", "1", "--warmup-epochs", str(warmup), "--lr-per-step",
              "--precision", "fp32", "--lr", str(lr), "--recipe", cfg.teacher_recipe, *args, batch_size=batch_size)

    def teacher_logits(name: str, data: str, teacher: str, img_size: int, epochs: int, *args: str) -> None:
        # A store can exist half-computed: the step is done when the command that completes it returned.
        _unless_done(out, name, join(out, "steps", name + ".done"), [
            "teacher-logits", data, stores[name], "--teacher", cfg.teacher, "--teacher-weights", weights(teacher),
            "--views", str(-(-epochs // cfg.repeats) * cfg.repeats), "--img-size", str(img_size), "--batch-size",
            "256", "--workers", str(cfg.store_workers), "--precision", "fp32", "--seed", str(cfg.seed), *args],
            mark_done=True)

    def student_args(epochs: int, lr: float, distillation: str, *args: str) -> list[str]:
        # fp32: a CPU without bf16 matrix units runs the bf16 backward several times slower (tests cover bf16).
        return ["--model", cfg.student[0], "--distillation", distillation, "--epochs", str(epochs), "--repeats",
                str(cfg.repeats), "--precision", "fp32", "--lr", str(lr), *args]

    # Fashion-MNIST: shards, the teacher, its store, the students.
    images = join(out, "fashion-mnist")
    write_image_folder(images, limit=cfg.train_images, val_limit=cfg.val_images)
    _unless_done(out, "shard", manifest_url(shards, "val"),
                 ["shard", images, shards, "--samples-per-shard", str(cfg.samples_per_shard), "--seed", str(cfg.seed)])
    train_teacher("teacher", shards, cfg.img_size, cfg.teacher_epochs, cfg.teacher_lr, 1)
    teacher_logits("store", shards, "teacher", cfg.img_size, cfg.student_epochs)
    if "soft_store_k2" in cfg.students:
        teacher_logits("store_k2", shards, "teacher", cfg.img_size, cfg.student_epochs, *POOR_STORE)
    teacher_args = {"store": ["--logits", stores["store"]],
                    # Past the default --max-target-kl on purpose: this run shows what a poor tail costs.
                    "store_k2": ["--logits", stores["store_k2"], "--max-target-kl", "100"],
                    # fp32 like the store, so the two hard students get the same teacher answers.
                    "online": ["--teacher-online", cfg.teacher, "--teacher-weights", weights("teacher"),
                               "--teacher-precision", "fp32"],
                    None: []}
    for name in cfg.students:
        distillation, source = STUDENT_RUNS[name]
        train(name, shards, *student_args(cfg.student_epochs, cfg.lr, distillation, *cfg.student[1:],
                                          *teacher_args[source], "--img-size", str(cfg.img_size),
                                          "--warmup-epochs", "1", "--lr-per-step"))

    # DeiT's fine-tuning at a higher resolution: the best student, hard-distilled from a teacher at that size
    # (the 32 px teacher scores larger views near chance: it is fine-tuned to them first) through a store at that
    # size; the student's shape comes from its export, its position embeddings are resampled.
    best = max(cfg.students, key=lambda name: _final(runs, name)["avg_top1"])
    train_teacher("teacher_fine_tune", shards, cfg.fine_tune_size, cfg.teacher_fine_tune_epochs, cfg.teacher_lr / 2,
                  0, "--init", weights("teacher"))
    teacher_logits("store_fine_tune", shards, "teacher_fine_tune", cfg.fine_tune_size, cfg.fine_tune_epochs)
    train("fine_tune", shards, "--init", weights(best), *student_args(
        cfg.fine_tune_epochs, cfg.fine_tune_lr, "hard", "--logits", stores["store_fine_tune"], "--min-lr",
        str(cfg.fine_tune_lr), "--weight-decay", "1e-8", "--warmup-epochs", "0"))

    # Transfer to handwritten digits at the fine-tuned size: the teacher fine-tuned on them makes their store;
    # the fine-tuned student learns them with and without it.
    digit_images = join(out, "digits")
    digits.write_image_folder(digit_images)
    _unless_done(out, "shard_digits", manifest_url(digit_shards, "val"),
                 ["shard", digit_images, digit_shards, "--samples-per-shard", "250", "--seed", str(cfg.seed)])
    train_teacher("digits_teacher", digit_shards, cfg.fine_tune_size, cfg.transfer_epochs, cfg.teacher_lr, 1,
                  "--init", weights("teacher_fine_tune"), "--new-head", batch_size=cfg.transfer_batch_size)
    teacher_logits("store_digits", digit_shards, "digits_teacher", cfg.fine_tune_size, cfg.transfer_epochs)
    for name, distillation, store_args in (("transfer_none", "none", ["--img-size", str(cfg.fine_tune_size)]),
                                           ("transfer_hard", "hard", ["--logits", stores["store_digits"]])):
        train(name, digit_shards, "--init", weights("fine_tune"), "--new-head", *student_args(
            cfg.transfer_epochs, cfg.transfer_lr, distillation, *store_args, "--warmup-epochs", "1",
            "--lr-per-step"), batch_size=cfg.transfer_batch_size)

    return write_results(out, cfg, best, {k: v for k, v in stores.items() if k != "store_k2"
                                          or "soft_store_k2" in cfg.students})


def _final(runs: str, name: str) -> dict:
    with open(join(runs, name, "results.json")) as f:
        return json.load(f)["final"]


# The rows after the students: (name, what it is).
LATER_RUNS = {
    "teacher_fine_tune": "teacher fine-tuned at {size} px",
    "fine_tune": "fine-tuned at {size} px (hard, store at {size} px)",
    "digits_teacher": "teacher fine-tuned on the digits",
    "transfer_none": "digits: transfer, no distillation",
    "transfer_hard": "digits: transfer, hard (digits store)",
}


def write_results(out: str, cfg: DemoConfig, best: str, stores: dict[str, str]) -> dict:
    from deit_pipe.storage.teacher_store import TeacherStore

    runs = join(out, "runs")

    def summary(name: str) -> dict:
        with open(join(runs, name, "results.json")) as f:
            res = json.load(f)
        timing = _wall_time_file(out, name)
        wall = float(Path(timing).read_text()) if os.path.exists(timing) else None  # None: done outside the demo
        return {**res["final"], "wall_s": wall, "images_per_s": res["images_per_s"]}

    def store_summary(url: str) -> dict:
        store = TeacherStore.open(url, "train")
        views = store.num_views * int(store.attrs["num_samples"])
        kl = dict(store.attrs["code_error"]["kl_mean"])
        return {"k": store.k, "code_rank": store.attrs["code"]["rank"], "bytes": store.nbytes_stored(),
                "views": views, "bytes_per_view": store.nbytes_stored() / views, "kl_tau1": kl[1.0], "kl_tau3": kl[3.0],
                "img_size": store.attrs["provenance"]["recipe"]["img_size"]}

    results = {
        "config": asdict(cfg),
        "teacher": summary("teacher"),
        "students": {name: summary(name) for name in cfg.students},
        "best_student": best,
        "later": {name: summary(name) for name in LATER_RUNS},
        "stores": {name: store_summary(url) for name, url in stores.items()},
        # This configuration's steps only: an output folder reused by another configuration keeps others.
        "steps_wall_s": sum(float(Path(_wall_time_file(out, step)).read_text())
                            for step in ("shard", "shard_digits", "teacher", *stores, *cfg.students, *LATER_RUNS)
                            if os.path.exists(_wall_time_file(out, step))),
    }
    with open(join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = results_table(results)
    with open(join(out, "results.md"), "w") as f:
        f.write(table)
    curves = {name: [(r["epoch"], r["avg_top1"]) for r in read_jsonl(join(runs, name, "metrics.jsonl"))]
              for name in (*cfg.students, *LATER_RUNS) if "teacher" not in name}
    plot_curves(curves, join(out, "students_top1.png"), "val top-1 (%), averaged heads",
                "DeiT student: Fashion-MNIST, fine-tuned, transferred to digits")
    return results


def _kl(nats: float) -> str:
    # A mean KL of an exact store lands a rounding error either side of 0: below it, it would print as -0.0000.
    # Only that sign goes (-0.0 + 0.0 is 0.0); a KL really below 0, a bug, still shows.
    return f"{round(nats, 4) + 0.0:.4f}"


def results_table(results: dict) -> str:
    def pct(row, key):
        return f"{row[key]:.2f}" if key in row else "-"

    size = results["config"]["fine_tune_size"]
    lines = [
        "| run | top-1 (avg heads) | top-1 cls head | top-1 dist head | top-5 | wall (s) | images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = {"teacher (" + results["config"]["teacher"] + ")": results["teacher"], **results["students"],
            **{f"{name}: {what.format(size=size)}" + (f", from {results['best_student']}" if name == "fine_tune"
                                                      else ""): results["later"][name]
               for name, what in LATER_RUNS.items()}}
    for name, r in rows.items():
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        lines.append(f"| {name} | {pct(r, 'avg_top1')} | {pct(r, 'cls_top1')} | {pct(r, 'dist_top1')} | "
                     f"{pct(r, 'avg_top5')} | {wall} | {r['images_per_s']:.0f} |")
    lines += ["", "| teacher store | img size | top-k | code rank | bytes/view | KL tau=1 | KL tau=3 |",
              "|---|---|---|---|---|---|---|"]
    for name, s in results["stores"].items():
        lines.append(f"| {name} | {s['img_size']} | {s['k']} | {s['code_rank']} | {s['bytes_per_view']:.1f} | "
                     f"{_kl(s['kl_tau1'])} | {_kl(s['kl_tau3'])} |")
    lines.append("")
    lines.append("KL: mean KL(teacher || distribution rebuilt from the store) on held-out views, in nats.")
    lines.append(f"Steps' wall time in all: {results['steps_wall_s'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"
