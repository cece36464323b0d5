"""The picture of a training run: its loss parts and validation metrics against the step,
drawn from the rows of metrics.jsonl at the end of `gensr train`."""

from __future__ import annotations

import io
import json

from gensr_ray import storage

LOSSES = ("loss", "loss_answer", "loss_listwise", "loss_contrastive")
VALIDATION = ("val/search/NDCG@10", "val/rec/NDCG@10", "val/mean/NDCG@10")


def read_metrics(path: str) -> list[dict]:
    """The reports of a run (metrics.jsonl, local or a URI), in order."""
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def plot_training(rows: list[dict], path: str, title: str = "") -> None:
    """Loss parts (left) and validation NDCG@10 (right, when the run validated) against the
    step, written as a PNG to `path` (local or a URI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validated = [r for r in rows if VALIDATION[-1] in r]
    fig, axes = plt.subplots(1, 2 if validated else 1, figsize=(10 if validated else 5.5, 3.6),
                             squeeze=False)
    ax = axes[0][0]
    for key in LOSSES:
        points = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
        if points:
            ax.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (window mean)")
    ax.set_yscale("log")
    ax.legend()
    if validated:
        ax = axes[0][1]
        for key in VALIDATION:
            points = [(r["step"], r[key]) for r in validated if key in r]
            ax.plot(*zip(*points), label=key.removeprefix("val/"), marker="o")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation (sampled protocol)")
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(path, buffer.getvalue())
