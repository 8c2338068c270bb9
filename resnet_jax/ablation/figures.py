"""The report's PNGs: Figure 6 (error vs iterations), Figure 7 (layer-response std), and the
per-layer gradient norms over training. Matplotlib with the non-interactive Agg backend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from resnet_jax.ablation.grid import net_name  # noqa: E402
from resnet_jax.rundir.files import atomic_write  # noqa: E402

KIND_TITLES = {"plain": "plain networks", "residual": "ResNets"}


def _colors(depths: list[int]) -> dict[int, tuple]:
    cmap = plt.get_cmap("tab10")
    return {d: cmap(i % 10) for i, d in enumerate(sorted(depths))}


def figure6(curves: dict[tuple[str, int], dict], path: str | Path) -> Path:
    """Error (%) vs iterations like the paper's Figure 6: one panel per kind, one colour per depth,
    thin dashed training error and bold test error.

    `curves[(kind, depth)]` holds "train" and "test" as (steps, errors) lists.
    """
    kinds = [k for k in KIND_TITLES if any(key[0] == k for key in curves)]
    colors = _colors(sorted({d for _, d in curves}))
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False,
                             sharey=True)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for (k, depth), c in sorted(curves.items()):
            if k != kind:
                continue
            name = net_name(kind, depth)
            for split, style in (("train", dict(lw=0.9, ls="--")), ("test", dict(lw=2.2))):
                steps, errors = c.get(split, ([], []))
                if split == "test" and len(steps) <= 20:
                    # Sparse evaluations (e.g. one at the end of a short run) stay visible.
                    style = dict(style, marker="o", ms=5)
                if len(steps):
                    ax.plot(steps, errors, color=colors[depth], **style,
                            label=name if split == "test" else None)
        ax.set_title(KIND_TITLES[kind])
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend(title="bold: test, dashed: train", fontsize=8)
    axes[0][0].set_ylabel("error (%)")
    return _save(fig, path)


def figure7(responses: dict[tuple[str, int], list[float]], path: str | Path) -> Path:
    """Std of each 3x3 layer's response, in network order (top) and sorted descending (bottom),
    plain (dashed) vs residual (solid), one colour per depth, as the paper's Figure 7."""
    colors = _colors(sorted({d for _, d in responses}))
    fig, axes = plt.subplots(2, 1, figsize=(8, 7))
    for (kind, depth), std in sorted(responses.items()):
        style = dict(color=colors[depth], ls="--" if kind == "plain" else "-", marker=".", ms=3,
                     label=net_name(kind, depth))
        x = np.arange(1, len(std) + 1)
        axes[0].plot(x, std, **style)
        axes[1].plot(x, sorted(std, reverse=True), **style)
    axes[0].set_xlabel("layer index (original)")
    axes[1].set_xlabel("layer index (sorted by magnitude)")
    for ax in axes:
        ax.set_ylabel("std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def gradient_norm_figure(grads: dict[tuple[str, int], dict], path: str | Path) -> Path:
    """Per-layer gradient norms at each saved checkpoint: a row per kind, a column per depth,
    one line per checkpoint (colour = training step), log scale shared by all panels."""
    kinds = [k for k in KIND_TITLES if any(key[0] == k for key in grads)]
    depths = sorted({d for _, d in grads})
    fig, axes = plt.subplots(len(kinds), len(depths), figsize=(4 * len(depths), 3.2 * len(kinds)),
                             squeeze=False, sharey=True)
    last = max((max(g["steps"]) for g in grads.values() if g["steps"]), default=1)
    cmap = plt.get_cmap("viridis")
    for i, kind in enumerate(kinds):
        for j, depth in enumerate(depths):
            ax = axes[i][j]
            g = grads.get((kind, depth))
            ax.set_title(net_name(kind, depth), fontsize=10)
            if not g:
                ax.set_axis_off()
                continue
            for step, norms in zip(g["steps"], g["norms"], strict=True):
                ax.plot(np.arange(1, len(norms) + 1), norms, color=cmap(step / max(last, 1)),
                        lw=1.2, label=f"step {step}")
            ax.set_yscale("log")
            ax.set_xlabel("conv layer (1 = stem)")
            ax.grid(alpha=0.3)
            if len(g["steps"]) <= 8:
                ax.legend(fontsize=6)
        axes[i][0].set_ylabel("gradient L2 norm")
    fig.suptitle("Per-layer gradient norms on a fixed training batch, at each checkpoint")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    try:
        # The temporary name has no image suffix, so the format is given explicitly.
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110,
                                                          format=path.suffix.lstrip(".")))
    finally:
        plt.close(fig)
