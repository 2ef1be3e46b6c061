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
