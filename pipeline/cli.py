"""The `deit-pipe` command line.

Heavy imports (torch, timm, deepspeed) happen inside each command so `--help` stays fast.
Bad input raises InputError deep down, a failing machine or service EnvironmentFault; `main` prints either as
one line and exits 2 or 3, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Annotated

import typer

from deit_pipe.choices import Distillation, Precision, SoftReduction
from deit_pipe.errors import EnvironmentFault, InputError
from deit_pipe.pipeline.launch import end_with_launcher

app = typer.Typer(
    name="deit-pipe",
    help=(
        "Train DeiT students with the RegNet teacher's outputs computed once and stored.\n\n"
        "Stages, run in order: `shard` (ImageFolder -> WebDataset shards + manifest), "
        "`teacher-logits` (teacher runs once -> Zarr store), `train` (DeiT student under DeepSpeed ZeRO)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("fashion-mnist")
def fashion_mnist(
    dest: Annotated[str, typer.Argument(help="Output ImageFolder root (gets train/ and val/).")],
    source: Annotated[str, typer.Option(help="Folder with Debian's Fashion-MNIST IDX files.")] = (
        "/usr/share/datasets/fashion-mnist"
    ),
    limit: Annotated[int, typer.Option(help="Train images to write, balanced over classes (0 = all 60,000).")] = 0,
    val_limit: Annotated[int, typer.Option(help="Val images to write (0 = all 10,000).")] = 0,
) -> None:
    """Write Fashion-MNIST (demo and test data) as an ImageFolder of PNGs."""
    from deit_pipe.pipeline.fashion_mnist import write_image_folder

    counts = write_image_folder(dest, source, limit, val_limit)
    typer.echo(f"wrote {counts['train']} train and {counts['val']} val images to {dest}")


@app.command("shard")
def shard(
    src: Annotated[str, typer.Argument(help=(
        "ImageFolder root with train/ and/or val/ holding class folders (ImageNet layout), or one split "
        "folder (its name becomes the split's); local path or fsspec URL."))],
    dest: Annotated[str, typer.Argument(help=(
        "Output URL prefix (local dir, s3://bucket/prefix, memory://...). Gets <split>/<split>-NNNNNN.tar, "
        "<split>/manifest.json (written last) and <split>/_work/ (scan results and commit markers a rerun "
        "resumes from)."))],
    samples_per_shard: Annotated[int, typer.Option(min=1, help=(
        "Samples per tar shard; 1000 ImageNet images make about 110 MB. Shard s holds idx [s*S, (s+1)*S)."))] = 1000,
    seed: Annotated[int, typer.Option(min=0, help=(
        "Seed of the shuffle that gives each sample its idx (mixed with the split name): the same SRC and "
        "seed give byte-identical shards."))] = 0,
    max_side: Annotated[int, typer.Option(min=0, help=(
        "Pre-resize: every image re-encoded as JPEG with its longer side at most this many pixels, to cut "
        "decode cost at train time. 0 keeps the original JPEG/PNG bytes."))] = 0,
    jpeg_quality: Annotated[int, typer.Option(
        min=1, max=100, help="JPEG quality of the images --max-side re-encodes.")] = 90,
    max_pixels: Annotated[int, typer.Option(min=0, help=(
        "Reject images whose header claims more than this many pixels (width*height; decompression bombs), "
        "before decoding them. 0 = PIL's limit (about 89.5 million)."))] = 0,
    workers: Annotated[int, typer.Option(min=0, help=(
        "Local worker processes per rank (0 = one per CPU core); the output does not depend on it. Across "
        "nodes, launch one process per rank with RANK/WORLD_SIZE set (torchrun, srun): each writes its own "
        "shards, rank 0 the manifest."))] = 0,
) -> None:
    """Pack an ImageFolder into WebDataset tar shards with a manifest per split (DESIGN invariant 1).

    Odd inputs never abort the run: CMYK, 16-bit, palette and alpha images are converted to 8-bit RGB,
    truncated, empty and non-image files and decompression bombs are rejected, all listed with their reason
    in the manifest. Hidden files and non-image extensions are skipped and counted. Resumable: rerun the
    same command after a crash and only uncommitted shards are redone.
    """
    from deit_pipe.stages import shard as stage

    options = stage.ShardOptions(samples_per_shard, seed, max_side, jpeg_quality,
                                 max_pixels or stage.DEFAULT_MAX_PIXELS)
    for report in stage.run(src, dest, options, workers or stage.default_workers()):
        for line in stage.summary(report):
            typer.echo(line)


Split = Annotated[str, typer.Option(help="Which split's shards (train, val, ...).")]
RecipeJSON = Annotated[str | None, typer.Option(
    "--recipe",
    help='View recipe fields to change from DeiT\'s defaults, as JSON or a path to a JSON file, e.g. '
    '\'{"auto_augment": null, "reprob": 0}\'. Fields: img_size mean std interpolation scale ratio hflip '
    'auto_augment color_jitter reprob remode recount mixup_alpha cutmix_alpha mix_prob switch_prob smoothing seed.')]


def recipe_overrides(text: str | None) -> dict:
    """`--recipe`: inline JSON or the path of a JSON file, an object of ViewRecipe fields."""
    if not text:
        return {}
    source = text
    if not text.lstrip().startswith("{"):
        try:
            with open(text) as f:
                source = f.read()
        except OSError as exc:
            raise InputError(f"--recipe {text}: {exc.strerror}") from None
    try:
        overrides = json.loads(source)
    except json.JSONDecodeError as exc:
        raise InputError(f"--recipe is not valid JSON: {exc}") from None
    if not isinstance(overrides, dict):
        raise InputError("--recipe must be a JSON object of view recipe fields")
    return overrides


Device = Annotated[str, typer.Option(
    help="torch device for the teacher: cpu; cuda (each rank its local rank's GPU, or the one GPU it sees); "
         "cuda:1 (exactly that one).")]


@app.command("teacher-logits")
def teacher_logits(
    shards: Annotated[str, typer.Argument(help="Shard root written by `deit-pipe shard` (any fsspec URL).")],
    store: Annotated[str, typer.Argument(help="Teacher store URL (Zarr v3): local path, s3://, gs://, memory://.")],
    teacher: Annotated[str, typer.Option(
        help="timm model name of the teacher (DeiT uses regnety_160).")] = "regnety_160",
    teacher_weights: Annotated[str | None, typer.Option(
        help="Teacher weights, .safetensors or .pth (loaded weights-only), local path or fsspec URL. "
        "Nothing is downloaded: without it the teacher is random (for smoke tests only).")] = None,
    views: Annotated[int, typer.Option(help="Views per sample to store (one per training epoch, see DESIGN).")] = 1,
    topk: Annotated[int, typer.Option(
        help="Teacher logits kept exactly per view (fp16, with classes): top-1 for hard distillation, the head "
        "of the distribution for soft.")] = 10,
    code_rank: Annotated[int, typer.Option(min=0, help=(
        "Coordinates per view of the whole logit vector in the store's code basis (int8 each, zstd-compressed): "
        "keeps the shape of the distribution's tail for soft distillation. 0: the tail takes the mean logits' shape."
    ))] = 256,
    code_step: Annotated[float, typer.Option(
        min=1e-6, help="Quantisation step of a code coordinate in logit units: smaller is closer and larger.")] = 0.7,
    code_fit_views: Annotated[int, typer.Option(
        min=1, help="Views (view 0 of the first samples) the code is fitted on; every fifth measures its KL.")] = 4096,
    img_size: Annotated[int, typer.Option(help="View size in pixels; binds the store to the recipe.")] = 224,
    seed: Annotated[int, typer.Option(
        help="View recipe seed: views are a pure function of (seed, split, idx, view).")] = 0,
    recipe: RecipeJSON = None,
    batch_size: Annotated[int, typer.Option(help="Teacher batch size.")] = 64,
    workers: Annotated[int, typer.Option(min=0, help=(
        "Loader worker processes per rank (decode + augment), best on cores the teacher does not use. "
        "With the teacher on CPU: leave them cores (torch threads, OMP_NUM_THREADS), or 0 to build the "
        "views between teacher batches."))] = 2,
    device: Device = "cpu",
    precision: Annotated[Precision, typer.Option(
        help="Teacher precision: fp32 (default: a bf16 forward flips 1-2% of top-1s and most stored logits) "
        "or bf16.")] = Precision.fp32,
    split: Split = "train",
) -> None:
    """Run the teacher ONCE over replayable views and store, per (sample, view), its top-k logits and a code
    of its whole distribution.

    Resumable (a rerun redoes only uncommitted units) and appendable (a larger --views adds views).
    Multi-rank: reads RANK/WORLD_SIZE (torchrun, srun) and splits the shards among ranks.
    """
    from deit_pipe.data.recipe import ViewRecipe
    from deit_pipe.stages import teacher_logits as stage

    summary = stage.run(
        shards, store, stage.TeacherSpec(teacher, teacher_weights, precision),
        ViewRecipe(img_size=img_size, seed=seed).with_overrides(recipe_overrides(recipe)),
        views=views, k=topk, split=split, batch_size=batch_size, workers=workers, device=device,
        code=stage.CodeSpec(code_rank, code_step, code_fit_views),
    )
    typer.echo(
        f"rank {summary['rank']}: wrote {summary['views_written']} views in {summary['units_written']} units; "
        f"store {summary['store_bytes']} bytes"
    )


@app.command("verify-store")
def verify_store(
    shards: Annotated[str, typer.Argument(help="Shard root the store was computed from.")],
    store: Annotated[str, typer.Argument(help="Teacher store URL.")],
    teacher_weights: Annotated[str | None, typer.Option(help="The teacher weights the store was made with.")] = None,
    units: Annotated[int, typer.Option(help="How many (shard, view) units to re-check.")] = 4,
    views_per_unit: Annotated[int, typer.Option(help="Views re-checked in each unit.")] = 64,
    tau: Annotated[list[float] | None, typer.Option(
        help="Temperature at which to report the KL of the rebuilt teacher distribution (repeatable; "
        "default 1 and 3).")] = None,
    device: Device = "cpu",
    split: Split = "train",
) -> None:
    """Check that STORE belongs to SHARDS, and that views and teacher outputs still replay."""
    from deit_pipe.stages import verify_store as stage

    taus = tuple(tau or (1.0, 3.0))
    r = stage.run(shards, store, teacher_weights, split, units, views_per_unit, device, taus)
    typer.echo(f"store: {r['store_bytes']} bytes for {r['views_stored']} views ({r['bytes_per_view']:.1f} bytes/view)")
    typer.echo(f"checked {r['views_checked']} views: digest match {r['digest_match_rate']:.4f}")
    if r["teacher_rerun"]:
        typer.echo(
            f"teacher re-run: top-1 match {r['top1_match_rate']:.4f}, max logit error "
            f"{r['max_logit_error_fp16_ulps']:.2f} fp16 ulps"
        )
        for t in taus:
            typer.echo(f"rebuilt teacher distribution at tau={t:g}: KL mean {r[f'target_kl_mean_tau{t:g}']:.3g} "
                       f"max {r[f'target_kl_max_tau{t:g}']:.3g} nats")
    else:
        typer.echo("teacher not re-run: the store was made by a random-weights teacher (weights_sha256 'none'), "
                   "which cannot be rebuilt; digests only")
    if r["digest_match_rate"] < 1.0:
        raise InputError("replay drift: some views no longer match their stored digests")


@app.command("train")
def train(
    shards: Annotated[str, typer.Argument(help="Shard root with train/ (and val/ for evaluation).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Run folder: checkpoints, metrics, plot, student.")],
    logits: Annotated[str | None, typer.Option(
        help="Teacher store (cached targets) for soft/hard distillation.")] = None,
    model: Annotated[str, typer.Option(
        help="timm student: a *_distilled_* DeiT, or any model with --distillation none.")] = (
        "deit_tiny_distilled_patch16_224"
    ),
    init: Annotated[str | None, typer.Option(
        help="Start the student from these weights (DeiT's --finetune): a deit-pipe export or a timm "
        ".safetensors/.pth, local or fsspec URL, loaded weights-only. Another --img-size resamples the position "
        "embeddings (timm's checkpoint filter), another class count gets fresh heads (both for a distilled DeiT); "
        "ViT overrides not given (--patch-size, --depth, ...) are the export's own; the size is --img-size or the "
        "store's. A --resume loads its checkpoint instead of these weights (give the same arguments).")] = None,
    new_head: Annotated[bool, typer.Option(
        help="With --init: start the classifier(s) fresh even when the class count matches (a transfer to a data "
        "set with other classes).")] = False,
    distillation: Annotated[Distillation, typer.Option(
        help="DeiT's distillation type: hard (the teacher's top-1; DeiT's choice), soft (KL at --tau) or none.")
    ] = Distillation.hard,
    alpha: Annotated[float, typer.Option(help="Weight of the distillation term.")] = 0.5,
    tau: Annotated[float, typer.Option(help="Soft distillation temperature.")] = 1.0,
    max_target_kl: Annotated[float, typer.Option(
        help="Refuse soft targets from a store whose rebuilt teacher is further than this mean KL (nats) at --tau.")
    ] = 0.05,
    soft_reduction: Annotated[SoftReduction, typer.Option(
        help="The soft KL sum over the batch divided by n x classes (DeiT's) or by n (batchmean).")
    ] = SoftReduction.sum_numel,
    teacher_online: Annotated[str | None, typer.Option(
        help="DeiT's original mode: run this timm teacher on every batch instead of reading a store.")] = None,
    teacher_weights: Annotated[str | None, typer.Option(help="Weights of the online teacher.")] = None,
    teacher_precision: Annotated[Precision | None, typer.Option(
        help="The online teacher's precision (default: --precision); match the store's to compare.")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs; with R repeats they use ceil(E/R)*R stored views.")] = 300,
    batch_size: Annotated[int, typer.Option(help="Micro batch per rank.")] = 64,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    repeats: Annotated[int, typer.Option(help="Repeated augmentation count R (DeiT: 3).")] = 3,
    img_size: Annotated[int | None, typer.Option(help="View size without a store (a store brings its own).")] = None,
    patch_size: Annotated[int | None, typer.Option(help="ViT/DeiT patch size override (small data).")] = None,
    depth: Annotated[int | None, typer.Option(help="ViT/DeiT depth override.")] = None,
    embed_dim: Annotated[int | None, typer.Option(help="ViT/DeiT width override.")] = None,
    num_heads: Annotated[int | None, typer.Option(help="ViT/DeiT attention heads override.")] = None,
    drop_path: Annotated[float, typer.Option(help="Stochastic depth rate.")] = 0.1,
    lr: Annotated[float, typer.Option(help="Learning rate per 512 images of global batch.")] = 5e-4,
    warmup_epochs: Annotated[int, typer.Option(
        help="Linear warmup from --warmup-lr over these epochs (timm's cosine scheduler, stepped per epoch as in "
        "DeiT).")] = 5,
    warmup_lr: Annotated[float, typer.Option(help="Learning rate of epochs 0 and 1 (DeiT steps the scheduler after "
                                             "each epoch).")] = 1e-6,
    min_lr: Annotated[float, typer.Option(help="Cosine floor.")] = 1e-5,
    lr_per_step: Annotated[bool, typer.Option(
        help="Evaluate the schedule at every step's fractional epoch instead of once per epoch (DeiT).")] = False,
    weight_decay: Annotated[float, typer.Option(
        help="AdamW weight decay; none on model.no_weight_decay() (pos_embed, cls/dist tokens), biases, "
        "norms.")] = 0.05,
    zero: Annotated[int, typer.Option(min=0, max=3, help="DeepSpeed ZeRO stage.")] = 2,
    precision: Annotated[Precision, typer.Option(help="The student's precision (DeepSpeed's bf16 or fp32).")
    ] = Precision.bf16,
    ds_config: Annotated[str | None, typer.Option(help="DeepSpeed JSON whose keys override ours.")] = None,
    seed: Annotated[int, typer.Option(help="Order and view seed (a store brings its own view seed).")] = 0,
    recipe: RecipeJSON = None,
    workers: Annotated[int | None, typer.Option(
        min=0, help="Loader worker processes per rank (default: the node's cores per local rank, less one).")
    ] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Also checkpoint every N steps (0: epoch ends only).")] = 0,
    keep_checkpoints: Annotated[int, typer.Option(
        min=0, help="Keep the newest K checkpoints on disk, removing older ones (0: keep all).")] = 2,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in --output.")] = False,
    allow_view_reuse: Annotated[bool, typer.Option(help="Reuse stored views past the end of the store.")] = False,
    exchange: Annotated[bool, typer.Option(
        help="Each rank of a repeated-augmentation team makes every copy of its share of a step's samples (one "
        "decode a sample for the team, not one a copy) and the views reach their ranks by all_to_all: the same "
        "batches, less loader work on more than one rank. Needs --batch-size >= --repeats.")] = False,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps in total (with a checkpoint).")] = 0,
    nproc_per_node: Annotated[int, typer.Option(
        help="Start this many local ranks (via torchrun); leave 0 when launched by torchrun/deepspeed/srun.")] = 0,
) -> None:
    """Train a DeiT student under DeepSpeed ZeRO, reading image shards and cached teacher targets side by side."""
    from deit_pipe.distributed.deepspeed_engine import EngineSpec
    from deit_pipe.optim.schedule import LRSchedule
    from deit_pipe.stages import train as stage

    cfg = stage.TrainConfig(
        shards=shards, output=output, store=logits,
        student=stage.StudentSpec(model, patch_size, depth, embed_dim, num_heads, drop_path),
        init=init, new_head=new_head,
        distillation=distillation, alpha=alpha, tau=tau, max_target_kl=max_target_kl,
        soft_reduction=soft_reduction, teacher_online=teacher_online, teacher_weights=teacher_weights,
        teacher_precision=teacher_precision,
        epochs=epochs, repeats=repeats, seed=seed, img_size=img_size, recipe_overrides=recipe_overrides(recipe),
        engine=EngineSpec(zero, precision, batch_size, grad_accum, user_config=ds_config),
        schedule=LRSchedule(lr, warmup_lr, min_lr, warmup_epochs, epochs, lr_per_step), weight_decay=weight_decay,
        workers=workers, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, resume=resume,
        allow_view_reuse=allow_view_reuse, exchange=exchange, max_steps=max_steps,
    )
    if nproc_per_node:
        from deit_pipe.pipeline.launch import relaunch_under_torchrun

        # Bad input is refused here, as one line, before any rank starts.
        stage.check_config(cfg, nproc_per_node)
        relaunch_under_torchrun(nproc_per_node)
        return
    result = stage.run(cfg)
    if result.get("final") is not None:
        typer.echo(json.dumps(result["final"]))


@app.command("eval")
def evaluate(
    shards: Annotated[str, typer.Argument(help="Shard root written by `deit-pipe shard` (any fsspec URL).")],
    weights: Annotated[str, typer.Argument(help=(
        "Weights to score: a deit-pipe export (student.safetensors, whose metadata rebuilds the model) or a timm "
        "checkpoint (.safetensors or .pth state dict, with --model); local path or fsspec URL, loaded weights-only."))],
    model: Annotated[str | None, typer.Option(help=(
        "timm architecture of a checkpoint that does not name its own (timm's .pth/.safetensors); a deit-pipe "
        "export names its own."))] = None,
    img_size: Annotated[int | None, typer.Option(min=1, help=(
        "Evaluate at this size instead of the weights' own: a ViT/DeiT is rebuilt for it (position embeddings "
        "resampled, as DeiT's fine-tuning does), a convnet takes it as it is."))] = None,
    crop_pct: Annotated[float | None, typer.Option(min=0.1, max=1.0, help=(
        "Resize to img-size / crop-pct before the centre crop (default: the model's, from timm's config, as "
        "validate.py; DeiT's main.py and train's evaluation use 0.875)."))] = None,
    split: Split = "val",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch and rank.")] = 64,
    workers: Annotated[int | None, typer.Option(
        min=0, help="Loader worker processes per rank (default: the node's cores per local rank, less one).")
    ] = None,
    precision: Annotated[Precision, typer.Option(
        help="fp32, or bf16: model and images cast to bf16, as a bf16 training run evaluates.")] = Precision.fp32,
    output: Annotated[str | None, typer.Option("--output", "-o", help=(
        "Where the JSON report goes (local path or fsspec URL); default beside the weights, "
        "<weights without extension>.eval.json."))] = None,
    nproc_per_node: Annotated[int, typer.Option(
        help="Start this many local ranks (via torchrun); leave 0 when launched by torchrun/deepspeed/srun.")] = 0,
) -> None:
    """Top-1/top-5 of WEIGHTS on a split of SHARDS: the averaged heads, and each head of a distilled DeiT.

    Images are resized and centre-cropped with the model's crop_pct, interpolation, mean and std, as timm's
    validate.py does; images of <= 32 px are only centre-cropped or padded, as a training run evaluates them.
    Prints a table and writes the report (scores, weights sha256, model, size, crop_pct, ranks) as JSON.
    """
    from deit_pipe.stages import evaluate as stage

    cfg = stage.EvalConfig(shards, weights, model, img_size, crop_pct, split, batch_size, workers, precision, output)
    if nproc_per_node:
        from deit_pipe.pipeline.launch import relaunch_under_torchrun

        # Bad input is refused here, as one line, before any rank starts.
        stage.prepare(cfg)
        relaunch_under_torchrun(nproc_per_node)
        return
    report = stage.run(cfg)
    if report is not None:
        for line in stage.summary(report):
            typer.echo(line)


@app.command("throughput")
def throughput(
    models: Annotated[list[str] | None, typer.Option(
        "--models", help="timm model to time (repeatable; default DeiT-Ti/S/B and the RegNetY-16GF teacher, "
        "DeiT's Table 1). Random weights: nothing is downloaded.")] = None,
    img_size: Annotated[int | None, typer.Option(min=1, help=(
        "Image size in pixels for every model (default: each model's own, 224 for Table 1's). Convnets take any "
        "size >= 32; ViT/DeiT are built for it."))] = None,
    batch: Annotated[int | None, typer.Option(min=1, help=(
        "Fixed batch size. Default: on a GPU the largest power of two that fits (DeiT timed the largest that "
        "fits), on a CPU 64 (memory does not limit a CPU)."))] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="On a GPU, stop doubling the batch here.")] = 1024,
    dtype: Annotated[str, typer.Option(help=(
        "GPU autocast dtype: bf16, fp16 or fp32 (no autocast). A CPU always runs fp32."))] = "bf16",
    warmup: Annotated[int, typer.Option(min=0, help="Untimed batches before the timed ones.")] = 3,
    iters: Annotated[int, typer.Option(min=1, help="Timed batches per model.")] = 10,
    threads: Annotated[int | None, typer.Option(min=1, help=(
        "torch threads on a CPU (default: every core this process may use)."))] = None,
    device: Annotated[str | None, typer.Option(help="torch device: cpu, cuda or cuda:N (default: a GPU if one is "
                                               "visible).")] = None,
    json_path: Annotated[str | None, typer.Option(
        "--json", help="Also write the report as JSON here (local path or fsspec URL).")] = None,
) -> None:
    """Inference images/s of each model on this machine (DeiT's Table 1 column), beside DeiT's V100 numbers and
    timm's published ones; prints a markdown table naming the machine."""
    from deit_pipe.stages import throughput as stage
    from deit_pipe.storage.location import put_atomic

    options = stage.ThroughputOptions(img_size, batch, max_batch, dtype, warmup, iters, threads)
    report = stage.run(tuple(models or stage.DEFAULT_MODELS), device, options)
    if json_path:
        put_atomic(json_path, json.dumps(report, indent=1).encode())
    typer.echo(stage.table(report))


@app.command("demo")
def demo(
    out: Annotated[str, typer.Argument(help="Output folder: data, shards, teacher store, runs, results, plots.")] = (
        "demo-output"
    ),
    full: Annotated[bool, typer.Option(
        help="All 70,000 images, six students, each 3x the samples (about 45 min on 2 cores).")] = False,
    shards: Annotated[str | None, typer.Option(
        help="Where the shards go (any fsspec URL); default OUT/shards.")] = None,
    store: Annotated[str | None, typer.Option(
        help="Where the teacher store goes (any fsspec URL); default OUT/teacher-store.")] = None,
) -> None:
    """The main job end to end on Fashion-MNIST: shards, a RegNet teacher, its store, four DeiT students; then
    the best student fine-tuned at 40 px and transferred to handwritten digits (scikit-learn's).

    Finished steps are skipped on a rerun. Prints the results table and writes results.md/.json and plots.
    """
    from deit_pipe.pipeline import demo as demo_job

    results = demo_job.run(out, demo_job.DemoConfig.full() if full else demo_job.DemoConfig(), shards, store)
    typer.echo(demo_job.results_table(results))


def one_line(exc: InputError | EnvironmentFault) -> str:
    """The message itself: a DataLoader worker's error arrives wrapped in the worker's traceback text."""
    text = str(exc).strip()
    last = text.splitlines()[-1] if text else ""
    prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return last[len(prefix):] if last.startswith(prefix) else text


def rank_prefix() -> str:
    """"rank R: " in a process of a multi-rank run, so the line says whose it is."""
    from deit_pipe.distributed.context import RankContext

    ctx = RankContext.from_env()
    return f"rank {ctx.rank}: " if ctx.world_size > 1 else ""


def retry_defaults() -> None:
    """Object-store calls retry with backoff to a budget a cluster job survives: botocore's adaptive mode, 10
    attempts, unless the environment or the AWS config file says otherwise (a throttled S3 costs time, not
    the run)."""
    try:
        with open(os.environ.get("AWS_CONFIG_FILE", os.path.expanduser("~/.aws/config"))) as f:
            config = f.read()
    except OSError:
        config = ""
    for key, variable, value in (("retry_mode", "AWS_RETRY_MODE", "adaptive"), ("max_attempts", "AWS_MAX_ATTEMPTS",
                                                                                  "10")):
        if key not in config:
            os.environ.setdefault(variable, value)


def main(argv: list[str] | None = None) -> None:
    end_with_launcher()
    retry_defaults()
    try:
        app(args=argv, standalone_mode=False)
    except (InputError, EnvironmentFault) as exc:
        rerun = f"; {exc.rerun}" if isinstance(exc, EnvironmentFault) and exc.rerun else ""
        typer.echo(f"deit-pipe: error: {rank_prefix()}{one_line(exc)}{rerun}", err=True)
        # A store call that failed part way leaves zarr's other coroutines unawaited: the warnings Python prints
        # about them at exit would follow the one line.
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("deit-pipe: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        # Usage errors from typer's click arrive here in non-standalone mode: show them as click would.
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
