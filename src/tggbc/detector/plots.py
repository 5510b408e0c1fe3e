"""Pictures of what tgGBC does: accuracy against decoder latency, and which keys survive where."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import write_atomic


def _save_figure(fig, path: Path) -> None:
    """Save atomically so a half-written PNG never replaces a good one."""
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))


def plot_accuracy_vs_latency(results, path: str | Path, title: str = "") -> Path:
    """mAP and NDS of each setting against its median decoder latency.

    Args:
        results: SettingResult list (from tggbc.detector.evaluate), dense first.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    latency = [r.decoder_ms for r in results]
    for metric, marker in (("mAP", "o"), ("NDS", "s")):
        values = [getattr(r, metric) for r in results]
        ax.plot(latency, values, marker=marker, linestyle="-", label=metric)
        for r, x, y in zip(results, latency, values, strict=True):
            if metric == "mAP":
                # Slanted labels: the pruned settings sit only a few milliseconds apart.
                label = r.name.replace("tggbc-", "prune ")
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(2, 6), rotation=45, fontsize=8)
    ax.set_xlabel("decoder latency per frame, ms (median, batch 1)")
    ax.set_ylabel("nuScenes metric (synthetic val)")
    ax.set_title(title or "tgGBC: accuracy against decoder latency")
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_kept_keys(images: np.ndarray, kept: list, feature_shape: tuple[int, int], path: str | Path, title: str = ""):
    """The six camera images with every key tinted by how many decoder layers saw it.

    Args:
        images: [6, H, W, 3] uint8.
        kept: per layer, [Nk_l] original key indices that layer saw (batch element 0 of
            DecoderOutput.kept); keys are camera-major (camera, row, column).
        feature_shape: (h, w) of the feature map (keys per camera = h * w).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    h, w = feature_shape
    num_cameras = images.shape[0]
    layers_seen = np.zeros(num_cameras * h * w, dtype=np.int64)
    for indices in kept:
        layers_seen[np.asarray(indices)] += 1
    grid = layers_seen.reshape(num_cameras, h, w)
    num_layers = len(kept)
    cmap = colormaps["viridis"]
    order = [5, 0, 1, 4, 3, 2]  # nuScenes layout: front-left, front, front-right / back-left, back, back-right
    names = ["FRONT", "FRONT_RIGHT", "BACK_RIGHT", "BACK", "BACK_LEFT", "FRONT_LEFT"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 3.4))
    for ax, cam in zip(axes.flat, order, strict=True):
        image = images[cam].astype(np.float32) / 255.0
        H, W = image.shape[:2]
        overlay = cmap(grid[cam] / num_layers)[..., :3]  # (h, w, 3)
        overlay = np.kron(overlay, np.ones((H // h, W // w, 1)))
        alpha = np.where(np.kron(grid[cam], np.ones((H // h, W // w))) >= num_layers, 0.15, 0.6)[..., None]
        ax.imshow(image * (1 - alpha) + overlay * alpha)
        ax.set_title(names[cam], fontsize=8)
        ax.axis("off")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(1, num_layers))
    fig.colorbar(sm, ax=axes, fraction=0.015, pad=0.01, label="decoder layers that saw the key")
    fig.suptitle(title or "Keys kept by tgGBC (bright: kept to the last layer; dark: dropped early)", fontsize=10)
    path = Path(path)
    _save_figure(fig, path)
    plt.close(fig)
    return path
