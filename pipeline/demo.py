"""`deit-pipe demo`: the whole pipeline on Fashion-MNIST, end to end, in one command.

ImageFolder -> shards -> a small RegNet teacher trained by our own train stage -> the teacher store ->
the same small DeiT student six ways (no distillation; hard and soft from the store; hard and soft with
the online teacher; soft from a second store that keeps only the top-2 of the 10 classes and no logit
code, which makes the cost of a poor tail visible), each under DeepSpeed ZeRO-2 on 2 local ranks. Every
step runs the real CLI in a subprocess, exactly as a user would, and is skipped when its output already
exists, so a rerun picks up where the last one stopped (a training run cut short resumes from its last
checkpoint).
The results table (markdown + JSON) and plots land in OUT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from deit_pipe.pipeline.fashion_mnist import write_image_folder
from deit_pipe.reporting.plots import plot_curves, read_jsonl
from deit_pipe.storage.location import exists, join
from deit_pipe.storage.manifest import manifest_url


@dataclass(frozen=True)
class DemoConfig:
    train_images: int = 6000
    val_images: int = 2000
    samples_per_shard: int = 250
    img_size: int = 32
    teacher: str = "regnetx_002"
    teacher_epochs: int = 12
    teacher_lr: float = 1e-2
    # The teacher learns on plain crops: DeiT's RegNet was trained apart from the student, and heavy
    # augmentation needs far more than a dozen epochs. The students use DeiT's full recipe.
    teacher_recipe: str = '{"auto_augment": null, "reprob": 0, "scale": [0.5, 1], "color_jitter": 0, ' \
                          '"mixup_alpha": 0, "cutmix_alpha": 0}'
    student_epochs: int = 9
    repeats: int = 3
    student: tuple = ("deit_tiny_distilled_patch16_224", "--patch-size", "4", "--depth", "4", "--embed-dim", "64",
                      "--num-heads", "4")
    batch_size: int = 64  # per rank
    lr: float = 4e-3  # per 512 images; small data and few epochs want a larger rate than ImageNet's 5e-4
    ranks: int = 2
    workers: int = 1
    seed: int = 0

    @classmethod
    def full(cls) -> DemoConfig:
        return cls(train_images=60000, val_images=10000, samples_per_shard=1000, teacher_epochs=20,
                   student_epochs=30, workers=2)


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
    images, runs = join(out, "fashion-mnist"), join(out, "runs")
    shards, store = shards or join(out, "shards"), store or join(out, "teacher-store")
    poor_store = store.rstrip("/") + "-k2"
    views = -(-cfg.student_epochs // cfg.repeats) * cfg.repeats
    common = ["--img-size", str(cfg.img_size), "--batch-size", str(cfg.batch_size), "--workers", str(cfg.workers),
              "--zero", "2", "--seed", str(cfg.seed)]

    write_image_folder(images, limit=cfg.train_images, val_limit=cfg.val_images)
    _unless_done(out, "shard", manifest_url(shards, "val"),
                 ["shard", images, shards, "--samples-per-shard", str(cfg.samples_per_shard), "--seed", str(cfg.seed)])

    teacher_dir = join(runs, "teacher")
    teacher_weights = join(teacher_dir, "student.safetensors")
    _unless_done(out, "teacher", join(teacher_dir, "results.json"), [
        "train", shards, "-o", teacher_dir, "--resume", "--model", cfg.teacher, "--distillation", "none",
        # fp32: bf16 buys a net this small no speed on a CPU, and fp32 keeps the teacher exact.
        "--epochs", str(cfg.teacher_epochs), "--repeats", "1", "--warmup-epochs", "1", "--lr-per-step",
        "--precision", "fp32", "--lr", str(cfg.teacher_lr), "--recipe", cfg.teacher_recipe, *common], ranks=cfg.ranks)

    # A store can exist half-computed: the step is done when the command that completes it returned.
    for step, url, extra in (("teacher-logits", store, []), ("teacher-logits-k2", poor_store, POOR_STORE)):
        _unless_done(out, step, join(out, "steps", step + ".done"), [
            "teacher-logits", shards, url, "--teacher", cfg.teacher, "--teacher-weights", teacher_weights,
            "--views", str(views), "--img-size", str(cfg.img_size), "--batch-size", "256", "--workers", "1",
            "--precision", "fp32", "--seed", str(cfg.seed), *extra], mark_done=True)

    for name, (distillation, source) in STUDENT_RUNS.items():
        run_dir = join(runs, name)
        teacher_args = {"store": ["--logits", store],
                        # Past the default --max-target-kl on purpose: this run shows what a poor tail costs.
                        "store_k2": ["--logits", poor_store, "--max-target-kl", "100"],
                        # fp32 like the store, so the two hard students get the same teacher answers.
                        "online": ["--teacher-online", cfg.teacher, "--teacher-weights", teacher_weights,
                                   "--teacher-precision", "fp32"],
                        None: []}[source]
        _unless_done(out, name, join(run_dir, "results.json"), [
            "train", shards, "-o", run_dir, "--resume", "--model", cfg.student[0], *cfg.student[1:], "--distillation",
            distillation, *teacher_args, "--epochs", str(cfg.student_epochs), "--repeats", str(cfg.repeats),
            "--warmup-epochs", "1", "--lr-per-step", "--precision", "bf16", "--lr", str(cfg.lr), *common],
            ranks=cfg.ranks)

    return write_results(out, cfg, {"store": store, "store_k2": poor_store})


def write_results(out: str, cfg: DemoConfig, stores: dict[str, str]) -> dict:
    from deit_pipe.storage.teacher_store import TeacherStore

    runs = join(out, "runs")

    def summary(name: str) -> dict:
        run_dir = join(runs, name)
        with open(join(run_dir, "results.json")) as f:
            res = json.load(f)
        timing = _wall_time_file(out, name)
        wall = float(Path(timing).read_text()) if os.path.exists(timing) else None  # None: done outside the demo
        return {**res["final"], "wall_s": wall, "images_per_s": res["images_per_s"]}

    def store_summary(url: str) -> dict:
        store = TeacherStore.open(url, "train")
        views = store.num_views * int(store.attrs["num_samples"])
        kl = dict(store.attrs["code_error"]["kl_mean"])
        return {"k": store.k, "code_rank": store.attrs["code"]["rank"], "bytes": store.nbytes_stored(),
                "views": views, "bytes_per_view": store.nbytes_stored() / views, "kl_tau1": kl[1.0], "kl_tau3": kl[3.0]}

    results = {
        "config": asdict(cfg),
        "teacher": summary("teacher"),
        "students": {name: summary(name) for name in STUDENT_RUNS},
        "stores": {name: store_summary(url) for name, url in stores.items()},
    }
    with open(join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = results_table(results)
    with open(join(out, "results.md"), "w") as f:
        f.write(table)
    plot_curves(
        {name: [(r["epoch"], r["avg_top1"]) for r in read_jsonl(join(runs, name, "metrics.jsonl"))]
         for name in STUDENT_RUNS},
        join(out, "students_top1.png"), "val top-1 (%), averaged heads", "DeiT student on Fashion-MNIST",
    )
    return results


def results_table(results: dict) -> str:
    def pct(row, key):
        return f"{row[key]:.2f}" if key in row else "-"

    lines = [
        "| run | top-1 (avg heads) | top-1 cls head | top-1 dist head | top-5 | wall (s) | images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = {"teacher (" + results["config"]["teacher"] + ")": results["teacher"], **results["students"]}
    for name, r in rows.items():
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        lines.append(f"| {name} | {pct(r, 'avg_top1')} | {pct(r, 'cls_top1')} | {pct(r, 'dist_top1')} | "
                     f"{pct(r, 'avg_top5')} | {wall} | {r['images_per_s']:.0f} |")
    lines += ["", "| teacher store | top-k | code rank | bytes/view | KL tau=1 | KL tau=3 |",
              "|---|---|---|---|---|---|"]
    for name, s in results["stores"].items():
        lines.append(f"| {name} | {s['k']} | {s['code_rank']} | {s['bytes_per_view']:.1f} | {s['kl_tau1']:.4f} | "
                     f"{s['kl_tau3']:.4f} |")
    lines.append("")
    lines.append("KL: mean KL(teacher || distribution rebuilt from the store) on held-out views, in nats.")
    return "\n".join(lines) + "\n"
