"""The `deit-pipe` command line.

Heavy imports (torch, timm, deepspeed) happen inside each command so `--help` stays fast.
Bad input raises InputError deep down; `main` prints it as one line and exits 2, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from deit_pipe.errors import InputError

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
    jpeg_quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG quality of the images --max-side re-encodes.")] = 90,
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

    options = stage.ShardOptions(samples_per_shard, seed, max_side, jpeg_quality, max_pixels or stage.DEFAULT_MAX_PIXELS)
    for report in stage.run(src, dest, options, workers or stage.default_workers()):
        for line in stage.summary(report):
            typer.echo(line)


@app.command("teacher-logits")
def teacher_logits() -> None:
    """Run the teacher once over replayable views and store its top-k logits (not implemented yet)."""
    raise InputError("`teacher-logits` is not implemented yet")


@app.command("train")
def train() -> None:
    """Train a DeiT student under DeepSpeed ZeRO from shards and the teacher store (not implemented yet)."""
    raise InputError("`train` is not implemented yet")


def main(argv: Optional[list[str]] = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except InputError as exc:
        typer.echo(f"deit-pipe: error: {exc}", err=True)
        sys.exit(2)
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
