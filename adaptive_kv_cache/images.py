"""Heatmaps of prefill attention per layer and the policy mix (--save_images or SAVE_IMAGE=1).

matplotlib is imported lazily. A run's images go into their own folder, `images/<run id>/`, which appears whole
or not at all: everything is drawn into a temporary folder that is renamed at the end.
"""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

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

    def __init__(self, out_dir="images", seq_label: Optional[int] = None):
        """
        Args:
            out_dir: folder for the figures.
            seq_label: the sequence's index to print in the titles when the observed batch is not the run's
                batch (see `write_run_images`); None: the index the cache passes.
        """
        self.out_dir = Path(out_dir)
        self.seq_label = seq_label
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
            rec = f"\nrecovery {recoveries[h]:.3f}" if recoveries[h] == recoveries[h] else ""  # nan: none
            ax.set_title(f"kv head {h}: {policies[h]}{rec}", fontsize=8)
            ax.set_xlabel("key position", fontsize=7)
            if h % cols == 0:
                ax.set_ylabel("query position", fontsize=7)
            ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="attention (log)")
        shown = seq if self.seq_label is None else self.seq_label
        fig.suptitle(f"layer {layer_id}, sequence {shown}: prompt attention per KV head", fontsize=10)
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
    ax.set_title("policy per layer")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_run_images(generator, prompt_tokens: Sequence[int], seq: int, folder, draw: bool = True,
                     stats: Optional[Dict] = None) -> Path:
    """Draws one sequence's prompt attention per layer and the policy mix into `folder`, atomically.

    The heatmaps come from a prefill of that sequence's prompt alone through a fresh compressed cache, so any
    sequence of a batch can be shown (the cache observes one sequence per pass) and the generation itself never
    pays for the L x L maps. Profiling is per sequence, so the policies drawn are the ones the batch chose.

    Args:
        generator: a `Llama` with a kv_config.
        prompt_tokens: the sequence's prompt token ids.
        seq: its index in the run, for the titles.
        folder: destination; it appears complete or not at all.
        draw: False on model-parallel ranks other than 0 (they run the prefill, which is collective, only).
        stats: memory statistics for the policy mix (default: the generator's last generation).

    Returns:
        folder as a Path.
    """
    folder = Path(folder)
    stats = generator.kv_stats if stats is None else stats
    tmp: Optional[Path] = None
    observer = None
    if draw:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the renamed folder gets the usual mode
        observer = AttentionHeatmaps(tmp, seq_label=seq)
    saved = generator.attention_observer
    generator.attention_observer = observer
    try:
        cache = generator.new_cache([list(prompt_tokens)], len(prompt_tokens))
        generator.model.forward(torch.tensor([list(prompt_tokens)], device=generator.device), 0, cache)
        if draw:
            if stats is not None:
                plot_policy_distribution(stats, tmp / "policy_distribution.png")
            if folder.exists():
                shutil.rmtree(folder)
            os.rename(tmp, folder)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        generator.attention_observer = saved
    return folder
