"""The two pictures a reviewer looks at first: the histogram of r, and the most r-copied
training images beside their closest generations.

matplotlib with the Agg backend (no display); each function returns PNG bytes.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from memshard.evaluation.memorization import THRESHOLDS, MemorizationReport  # noqa: E402


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def r_histogram(report: MemorizationReport, title: str) -> bytes:
    """Histogram of r over [0, 1], each MQ threshold a dashed line labelled with its count."""
    counts, edges = report.histogram()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="white", linewidth=0.3)
    top = max(1, counts.max())
    mq = report.mq_counts()
    for t in THRESHOLDS:
        ax.axvline(t, color="#c44e52", linestyle="--", linewidth=1)
        ax.text(t, top * 1.02, f"r<{t}: {mq[t]}", rotation=90, va="bottom", ha="right", fontsize=8, color="#c44e52")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, top * 1.35)
    ax.set_xlabel(f"r = d1² / mean(d1² … d{report.k}²), squared L2 to the nearest training images, pixels in [0, 1]",
                  fontsize=8)
    ax.set_ylabel("generations")
    ax.set_title(f"{title}\n{report.num_generations} generations; lower r = closer to one training image", fontsize=9)
    return _png(fig)


def _show(ax, image_chw: np.ndarray, caption: str, color: str = "black") -> None:
    image = np.asarray(image_chw).transpose(1, 2, 0)
    if image.shape[2] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(caption, fontsize=7, color=color)


def most_r_copied(report: MemorizationReport, training: np.ndarray, sample_ids: np.ndarray, generated: np.ndarray,
                title: str, rows: int = 8, per_row: int = 6) -> bytes:
    """One row per most r-copied training image (left, with its id and r-copy count), then its closest
    generations with their r, red when r < the r-copy threshold. (N, C, H, W) uint8 images."""
    chosen = report.most_r_copied(rows)
    lines = max(1, len(chosen))
    fig, axes = plt.subplots(lines, per_row + 1, figsize=(1.25 * (per_row + 1), 1.6 * lines + 0.6),
                             squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for line, row in enumerate(chosen):
        ax = axes[line, 0]
        ax.axis("on")
        _show(ax, training[row], f"train {sample_ids[row]}\n{report.r_copies[row]} r-copies", color="#4c72b0")
        for col, gen in enumerate(report.closest_generations(row, per_row), start=1):
            axes[line, col].axis("on")
            r_copy = report.r[gen] < report.r_copy_threshold
            _show(axes[line, col], generated[gen], f"gen {gen}\nr={report.r[gen]:.3f}",
                  color="#c44e52" if r_copy else "black")
    r_copied = int((report.r_copies > 0).sum())
    note = (f"{r_copied} training images r-copied (r < {report.r_copy_threshold}); most r-copies first" if r_copied
            else f"no generation has r < {report.r_copy_threshold}: the closest pairs are shown")
    fig.suptitle(f"{title}\n{note}", fontsize=9)
    return _png(fig)
