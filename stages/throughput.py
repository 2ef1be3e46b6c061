"""`deit-pipe throughput`: DeiT's Table 1 throughput column (inference images/s) measured on this machine.

Each model is built with random weights (speed depends on the architecture, not on what was learned), in eval
mode, at its own resolution, and timed under torch.inference_mode on random images: warm-up batches, then timed
ones. On a GPU it runs under autocast (bf16 unless asked otherwise) with the largest batch that fits, found by
doubling the batch until the GPU runs out of memory, as DeiT measured; on a CPU it runs in fp32 on torch's
threads with a fixed batch, since memory is not what limits a CPU. The table names the machine and prints
DeiT's V100 column and timm's published numbers beside ours.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from deit_pipe.distributed.context import RankContext, rank_device
from deit_pipe.errors import EnvironmentFault, InputError
from deit_pipe.models.registry import create_teacher, is_vit

DEFAULT_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "regnety_160")
CPU_BATCH = 64

# DeiT paper (Touvron et al. 2021), Table 1: images/s on one 16GB V100, largest batch at the model's resolution.
PAPER_V100 = {"deit_tiny_patch16_224": 2536, "deit_small_patch16_224": 940, "deit_base_patch16_224": 292,
              "regnety_160": 334}
# timm's published inference benchmark: infer_samples_per_sec at 224 px, batch 1024, AMP, NCHW, torch 2.9.1,
# CUDA 12.8, from huggingface/pytorch-image-models results/benchmark-infer-amp-nchw-pt291-cu128-4090.csv
# (commit 90cae8c5ab83).
TIMM_SOURCE = "timm, RTX 4090 AMP (results/benchmark-infer-amp-nchw-pt291-cu128-4090.csv)"
TIMM_PUBLISHED = {"deit_tiny_patch16_224": 18550, "deit_small_patch16_224": 8206, "deit_base_patch16_224": 2989,
                  "regnety_160": 1664}

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class ThroughputOptions:
    img_size: int | None = None  # None: each model's own resolution (its pretrained_cfg input_size)
    batch: int | None = None  # None: the largest that fits on a GPU, CPU_BATCH on a CPU
    max_batch: int = 1024  # the GPU search stops doubling here
    dtype: str = "bf16"  # GPU autocast; a CPU always runs fp32
    warmup: int = 3
    iters: int = 10
    threads: int | None = None  # CPU torch threads; None: every core this process may use

    def __post_init__(self):
        if self.dtype not in AUTOCAST_DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(AUTOCAST_DTYPES)}, not {self.dtype!r}")


def images_per_s(model: torch.nn.Module, batch: int, img_size: int, device: torch.device,
                 dtype: torch.dtype | None, warmup: int, iters: int) -> float:
    """Images/s of `model`'s forward over `iters` batches after `warmup` untimed ones; autocast to `dtype`
    unless it is None."""
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    model = model.to(device).eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for _ in range(warmup):
            model(images)
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            model(images)
        _synchronize(device)
    return iters * batch / (time.perf_counter() - start)


def largest_batch(runs: Callable[[int], object], cap: int) -> int:
    """The largest power of two up to `cap` for which `runs(batch)` does not run out of GPU memory."""
    fitted, batch = 0, 1
    while batch <= cap:
        try:
            runs(batch)
        except torch.cuda.OutOfMemoryError:
            break
        fitted, batch = batch, batch * 2
    torch.cuda.empty_cache()  # the failed attempt's blocks, before the timed run allocates its own
    if not fitted:
        raise EnvironmentFault("a batch of one image does not fit in GPU memory", rerun=None)
    return fitted


def run(models: tuple[str, ...] = DEFAULT_MODELS, device: str | None = None,
        options: ThroughputOptions = ThroughputOptions()) -> dict:
    """The machine, the settings and one row per model: its resolution, batch and images/s beside the paper's."""
    for name in models:
        is_vit(name)  # refuses an unknown name before minutes go into the others
    dev = rank_device(device, RankContext.from_env())
    dtype = AUTOCAST_DTYPES[options.dtype] if dev.type == "cuda" else None
    threads = options.threads or len(os.sched_getaffinity(0))
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = [_measure(name, dev, dtype, options) for name in tqdm(models, desc="throughput", leave=False)]
    finally:
        torch.set_num_threads(saved_threads)
    return {
        "machine": machine(dev), "device": str(dev), "torch": torch.__version__,
        "dtype": options.dtype if dtype is not None else "fp32", "threads": threads if dev.type == "cpu" else None,
        "batch_rule": _batch_rule(dev, options), "warmup": options.warmup, "iters": options.iters,
        "timm_source": TIMM_SOURCE, "models": rows,
    }


def _measure(name: str, device: torch.device, dtype: torch.dtype | None, options: ThroughputOptions) -> dict:
    # create_teacher builds any timm model frozen in eval mode, random without a weights file; img_size reaches
    # a ViT/DeiT only (convnets take any size).
    model = create_teacher(name, 1000, None, img_size=options.img_size)[0].to(device)
    img_size = options.img_size or model.pretrained_cfg["input_size"][-1]
    # A trial is one untimed forward.
    batch = options.batch or (CPU_BATCH if device.type == "cpu" else largest_batch(
        lambda b: images_per_s(model, b, img_size, device, dtype, warmup=1, iters=0), options.max_batch))
    speed = images_per_s(model, batch, img_size, device, dtype, options.warmup, options.iters)
    return {"model": name, "img_size": img_size, "batch": batch, "images_per_s": speed,
            "paper_v100": PAPER_V100.get(name), "timm_published": TIMM_PUBLISHED.get(name)}


def machine(device: torch.device) -> str:
    """The GPU's name, or the CPU's model, with the cores this process may use."""
    cores = f"{len(os.sched_getaffinity(0))} cores"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (host: {cpu_model()}, {cores})"
    return f"{cpu_model()}, {cores}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or "unknown CPU"


def table(report: dict) -> str:
    """The report as markdown: a line naming the machine and the settings, then one row per model."""
    threads = f", {report['threads']} torch threads" if report["threads"] else ""
    header = (f"Inference on {report['machine']}{threads}, torch {report['torch']}, {report['dtype']}, "
              f"batch {report['batch_rule']}, {report['warmup']} warm-up + {report['iters']} timed batches.")
    lines = [header, "",
             f"| model | resolution | batch | images/s here | DeiT paper, V100 | {report['timm_source']} |",
             "|---|---|---|---|---|---|"]
    for row in report["models"]:
        lines.append(f"| {row['model']} | {row['img_size']} | {row['batch']} | {row['images_per_s']:,.1f} | "
                     f"{_number(row['paper_v100'])} | {_number(row['timm_published'])} |")
    return "\n".join(lines)


def _batch_rule(device: torch.device, options: ThroughputOptions) -> str:
    if options.batch:
        return f"{options.batch} (fixed by --batch)"
    if device.type == "cpu":
        return f"{CPU_BATCH} (fixed: memory does not limit a CPU)"
    return f"the largest power of two that fits, up to {options.max_batch}"


def _number(value: int | None) -> str:
    return f"{value:,}" if value is not None else "-"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
