"""PNG plots of training metrics (matplotlib, no display needed)."""

from __future__ import annotations

import json


def _pyplot():
    """matplotlib's pyplot on a display-less backend, imported on first use: every rank of every run imports this
    module, and matplotlib alone takes half a second to import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training(metrics_path: str, png_path: str, title: str = "") -> None:
    """Train loss and val top-1 (each head) per epoch."""
    rows = read_jsonl(metrics_path)
    epochs = [r["epoch"] for r in rows]
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="loss")
    for head in ("avg", "cls", "dist"):
        if rows and f"{head}_top1" in rows[0]:
            ax_acc.plot(epochs, [r[f"{head}_top1"] for r in rows], marker="o", label=head)
    ax_acc.set(xlabel="epoch", ylabel="val top-1 (%)", title="accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def plot_curves(curves: dict[str, list[tuple[int, float]]], png_path: str, ylabel: str, title: str) -> None:
    """One line per run: {label: [(epoch, value), ...]}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    # Distinct markers and dashes: runs that agree exactly (cached vs online teacher) stay visible.
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("x", "-.")]
    for i, (label, points) in enumerate(curves.items()):
        marker, dash = styles[i % len(styles)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, linestyle=dash, label=label)
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
