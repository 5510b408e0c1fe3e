"""Pictures of the accuracy benchmark: mAP against the pruned fraction per method, and the keys kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import write_atomic

# One colour per method, tgGBC first and strongest.
_STYLE = {
    "tggbc": ("tab:red", "o", "tgGBC"),
    "attention": ("tab:orange", "s", "attention only"),
    "merge": ("tab:purple", "D", "key merging (ToMe)"),
    "random": ("tab:gray", "^", "random keys"),
    "inverse": ("tab:blue", "v", "most important dropped"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Save atomically so a half-written PNG never replaces a good one."""
    return write_atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))


def plot_accuracy_curve(results, path: str | Path, title: str = "") -> Path:
    """mAP against the fraction of keys dropped after layer 1, one curve per method.

    Args:
        results: SettingResult list from `tggbc.detector.evaluate` (the dense one included).
    The dense decoder is the horizontal line; shaded bands are the 95% intervals of each
    method's mAP (dense mAP plus the interval of its difference from dense).
    """
    plt = _pyplot()
    dense = next(r for r in results if r.method is None)
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    ax.axhline(dense.mAP, color="black", lw=1.2, label=f"dense ({dense.mAP:.3f})")
    methods = [m for m in _STYLE if any(r.method == m for r in results)]
    for method in methods:
        rows = sorted((r for r in results if r.method == method), key=lambda r: r.fraction)
        color, marker, label = _STYLE[method]
        x = np.array([100 * r.fraction for r in rows])
        y = np.array([r.mAP for r in rows])
        ax.plot(x, y, color=color, marker=marker, lw=2.0 if method == "tggbc" else 1.3, label=label)
        if all(r.mAP_diff is not None for r in rows):
            low = [dense.mAP + r.mAP_diff.low for r in rows]
            high = [dense.mAP + r.mAP_diff.high for r in rows]
            ax.fill_between(x, low, high, color=color, alpha=0.12, lw=0)
    ax.set_xlabel("keys dropped after decoder layer 1 (%)")
    ax.set_ylabel("mAP (nuScenes metric, synthetic val)")
    ax.set_title(title or "Which keys to drop: tgGBC against its controls")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_kept_keys(images: np.ndarray, kept: list, feature_shape: tuple[int, int], path: str | Path, title: str = ""):
    """The six camera images with every key tinted by how many decoder layers saw it.

    Args:
        images: [6, H, W, 3] uint8.
        kept: per layer, [Nk_l] original key indices that layer saw (batch element 0 of
            DecoderOutput.kept); keys are camera-major (camera, row, column).
        feature_shape: (h, w) of the feature map (keys per camera = h * w).
    """
    plt = _pyplot()
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
    out = save_figure(fig, path)
    plt.close(fig)
    return out
