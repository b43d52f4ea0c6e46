"""Heatmaps of prefill attention per layer and the policy mix (SAVE_IMAGE=1). matplotlib is imported lazily."""

from pathlib import Path
from typing import Dict, List

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class AttentionHeatmaps:
    """Cache observer that writes `layer{L}_attention.png`: every KV head's prompt attention, log colour scale.

    Each layer's figure is written as soon as that layer is profiled, so one layer's maps are held at a time.
    """

    def __init__(self, out_dir="images"):
        self.out_dir = Path(out_dir)
        self.paths: List[Path] = []

    def __call__(self, layer_id: int, seq: int, attention: torch.Tensor, policies: List[str],
                 recoveries: List[float]) -> None:
        """
        Args:
            layer_id: layer index.
            seq: batch index of the sequence shown.
            attention: (n_kv_heads, L, L) prompt attention (rows = queries), aggregated over each query group.
            policies: chosen hybrid of each KV head.
            recoveries: attention recovered by that hybrid, per KV head.
        """
        from matplotlib.colors import LogNorm

        plt = _pyplot()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        n = attention.shape[0]
        cols = min(n, 4)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
        a = attention.float().clamp(min=1e-6).numpy()
        for h in range(rows * cols):
            ax = axes[h // cols][h % cols]
            if h >= n:
                ax.axis("off")
                continue
            im = ax.imshow(a[h], norm=LogNorm(vmin=1e-6, vmax=1.0), cmap="viridis", interpolation="nearest")
            ax.set_title(f"kv head {h}: {policies[h]}\nrecovery {recoveries[h]:.3f}", fontsize=8)
            ax.set_xlabel("key position", fontsize=7)
            if h % cols == 0:
                ax.set_ylabel("query position", fontsize=7)
            ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="attention (log)")
        fig.suptitle(f"layer {layer_id}, sequence {seq}: prompt attention per KV head", fontsize=10)
        path = self.out_dir / f"layer{layer_id}_attention.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        self.paths.append(path)


def plot_policy_distribution(stats: Dict, path="images/policy_distribution.png") -> Path:
    """Stacked bars: how many (sequence, KV head) segments of each layer chose each candidate."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = stats["candidates"]
    layers = range(len(stats["layers"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) + 3) + 3, 4))
    bottom = [0] * len(layers)
    for name in names:
        counts = [stats["layers"][i]["policies"].get(name, 0) for i in layers]
        ax.bar(list(layers), counts, bottom=bottom, label=name)
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_xlabel("layer")
    ax.set_ylabel("(sequence, KV head) segments")
    ax.set_title("FastGen policy per layer")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
