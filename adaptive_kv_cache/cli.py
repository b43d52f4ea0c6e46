"""What the example scripts share: KV flags -> config, and the logs/images written around a run."""

import os
import sys
from typing import Optional

from adaptive_kv_cache.config import DEFAULT_CONFIG_PATH, FastGenConfig, load_config


def kv_config_from_flags(kv_config: Optional[str] = None, T: Optional[float] = None, r_l: Optional[float] = None,
                         r_f: Optional[float] = None, compress: bool = True) -> Optional[FastGenConfig]:
    """`--kv_config PATH --T --r_l --r_f --compress/--no-compress` -> a validated config (None = uncompressed).

    Runs before the model is loaded, so a bad setting fails first.
    """
    if not compress:
        return None
    config = load_config(kv_config if kv_config is not None else DEFAULT_CONFIG_PATH)
    overrides = {k: v for k, v in {"T": T, "r_l": r_l, "r_f": r_f}.items() if v is not None}
    return config.with_overrides(overrides)


def save_images_requested() -> bool:
    return os.environ.get("SAVE_IMAGE", "0") not in ("", "0", "false", "False")


def attach_outputs(generator, image_dir: str = "images") -> None:
    """With SAVE_IMAGE=1, makes the generator's caches draw each layer's prompt attention while profiling."""
    if save_images_requested() and generator.kv_config is not None:
        from adaptive_kv_cache.images import AttentionHeatmaps

        generator.attention_observer = AttentionHeatmaps(image_dir)


def report_outputs(generator, log_dir: str = "logs", image_dir: str = "images", rank: int = 0) -> None:
    """Prints the per-layer memory table of the last generation and writes it to logs/ (rank 0 only)."""
    from adaptive_kv_cache.report import render, write_logs

    stats = generator.kv_stats
    if stats is None or rank != 0:
        return
    config = generator.kv_config.to_dict() if generator.kv_config is not None else None
    paths = write_logs(stats, log_dir, config=config)
    print(render(stats, config=None))
    print(f"logs: {paths['md']} {paths['json']}", file=sys.stderr)
    if save_images_requested() and generator.kv_config is not None:
        from adaptive_kv_cache.images import plot_policy_distribution

        path = plot_policy_distribution(stats, os.path.join(image_dir, "policy_distribution.png"))
        print(f"images: {image_dir}/layer*_attention.png {path}", file=sys.stderr)
