"""Which precision the teacher-logits stage should run its teacher in: measured on the demo's teacher.

    python bench/teacher_precision.py [--demo demo-output] [--views 3000]

The demo's trained teacher (OUT/runs/teacher/student.safetensors) scores its own mixed training views
(OUT/shards, the demo's recipe) in fp32, under bf16 and fp16 autocast, and with a bf16 body but an fp32
classifier (and fp32 again in other batches, the rounding of other kernel shapes). For each: the share of
logits whose fp16 value (what the store keeps) equals the fp32
forward's, and the share of views whose top-1 agrees with it. Goal for the default: >= 99% and >= 99.9%.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.data.view_dataset import ViewDataset
from deit_pipe.data.view_plan import unit_items
from deit_pipe.data.views import ViewMaker
from deit_pipe.models.registry import create_teacher
from deit_pipe.storage.manifest import ShardManifest


def forwards(model):
    """name -> function(images) -> float32 logits."""
    def autocast(dtype):
        def run(x):
            with torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext():
                return model(x).float()
        return run

    def bf16_body_fp32_head(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model.forward_head(model.forward_features(x), pre_logits=True)
        return model.get_classifier()(features.float()).float()

    return {"bf16 autocast": autocast(torch.bfloat16), "fp16 autocast": autocast(torch.float16),
            "bf16 body, fp32 classifier": bf16_body_fp32_head}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="demo-output", help="a finished `deit-pipe demo` output folder")
    ap.add_argument("--views", type=int, default=3000)
    args = ap.parse_args(argv)
    shards = f"{args.demo}/shards"
    manifest = ShardManifest.load(shards, "train")
    model, _ = create_teacher("regnetx_002", len(manifest.classes), f"{args.demo}/runs/teacher/student.safetensors")
    maker = ViewMaker(ViewRecipe(img_size=32), "train")
    units = [(s, v) for v in range(3) for s in range(manifest.num_shards)]
    # Unit by unit: view 0 of every shard first (unit_items would put a shard's views 0-2 side by side).
    dataset = ViewDataset(shards, manifest, maker,
                          [item for u in units for item in unit_items(maker, manifest, [u], 250)])
    batches, count = [], 0
    for i in range(len(dataset)):
        batches.append(dataset[i][1].images)
        count += len(batches[-1])
        if count >= args.views:
            break
    images = torch.cat(batches)[: args.views]
    with torch.inference_mode():
        reference = model(images).float()
        print(f"demo teacher regnetx_002, {len(images)} mixed views at 32 px; against the fp32 forward:")
        print("| teacher precision | fp16 logits equal | top-1 agrees |")
        print("|---|---|---|")
        for name, forward in {"fp32 (default), batches of 97 instead of all at once": lambda x: torch.cat(
                [model(c) for c in x.split(97)]).float(), **forwards(model)}.items():
            logits = forward(images)
            equal = (logits.half() == reference.half()).float().mean().item()
            top1 = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
            print(f"| {name} | {equal:.4f} | {top1:.4f} |")


if __name__ == "__main__":
    sys.exit(main())
