"""Figures of an evaluation: ROC curves, confusion matrices, training curves, class AUC bars.

Each function draws one figure into a PNG path and stores ``metadata`` (code version,
parameters) in the PNG's text chunks. Figures are plain ``matplotlib.figure.Figure``
objects rendered by Agg: no pyplot state, no display, no global backend switch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

DPI = 120


def new_figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, **kwargs):
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(nrows, ncols, **kwargs)


def save_figure(figure: Figure, path: Path, metadata: Mapping[str, str] | None) -> None:
    figure.savefig(path, dpi=DPI, format="png", metadata=dict(metadata or {}))


def plot_roc(
    path: Path,
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    class_auc: np.ndarray,
    macro_auc: float,
    title: str,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Pooled one-vs-rest ROC curve of each present class, plus their macro average.

    The macro curve averages the class TPRs on a common FPR grid; its legend shows the
    macro AUC of the tables (mean of the class AUCs), not the area under the averaged curve.
    """
    figure, axes = new_figure((6.4, 6.0))
    grid = np.linspace(0.0, 1.0, 201)
    interpolated = []
    colors = matplotlib.colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    for c, name in enumerate(class_names):
        if math.isnan(class_auc[c]):
            axes.plot([], [], " ", label=f"{name}: n/a (absent from test set)")
            continue
        fpr, tpr, _ = roc_curve(labels == c, probs[:, c])
        interpolated.append(np.interp(grid, fpr, tpr))
        axes.plot(
            fpr, tpr, color=colors(c % colors.N), lw=1.5, label=f"{name} (AUC {class_auc[c]:.3f})"
        )
    if interpolated:
        mean_tpr = np.mean(interpolated, axis=0)
        mean_tpr[0] = 0.0
        axes.plot(
            grid, mean_tpr, color="black", lw=2.5, ls="--",
            label=f"macro average (AUC {macro_auc:.3f})",
        )  # fmt: skip
    else:
        axes.text(0.5, 0.5, "fewer than two classes: no ROC", ha="center", va="center")
    axes.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="False positive rate", ylabel="True positive rate")
    axes.set_title(title)
    axes.set_aspect("equal")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    save_figure(figure, path, metadata)


def plot_confusion(
    path: Path,
    confusion: np.ndarray,
    class_names: Sequence[str],
    title: str,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Heatmap of the row-normalised confusion matrix, each cell annotated with its count
    and row percentage (rows: true class)."""
    counts = np.asarray(confusion, dtype=np.float64)
    row_totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, row_totals, out=np.zeros_like(counts), where=row_totals > 0)
    size = max(4.5, 0.8 * len(class_names) + 2.5)
    figure, axes = new_figure((size + 1.0, size))
    image = axes.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of true class")
    for (row, column), count in np.ndenumerate(counts):
        share = f"{100 * rates[row, column]:.0f}%" if row_totals[row, 0] > 0 else "–"
        axes.text(
            column, row, f"{int(count)}\n{share}", ha="center", va="center", fontsize="small",
            color="white" if rates[row, column] > 0.5 else "black",
        )  # fmt: skip
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, labels=class_names)
    axes.set(xlabel="Predicted class", ylabel="True class")
    axes.set_title(title)
    figure.tight_layout()
    save_figure(figure, path, metadata)


def plot_training_curves(
    path: Path,
    logs: Mapping[str, pd.DataFrame],
    best_epochs: Mapping[str, int | None],
    title: str,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """One row per fold: the training loss terms (``train_*`` columns of log.csv) and the
    validation AUCs (``val_fine_auc``, ``val_coarse_auc``) against the epoch, with the
    selected (best) epoch marked."""
    if not logs:
        figure, axes = new_figure((6, 2))
        axes.axis("off")
        axes.text(0.5, 0.5, "no log.csv found in any fold", ha="center", va="center")
        axes.set_title(title)
        save_figure(figure, path, metadata)
        return
    figure, axes = new_figure((11, 3.2 * len(logs)), len(logs), 2, squeeze=False, sharex="row")
    for row, (fold, log_table) in enumerate(logs.items()):
        loss_axes, auc_axes = axes[row]
        epochs = (
            log_table["epoch"].to_numpy() if "epoch" in log_table else np.arange(len(log_table))
        )
        terms = [c for c in log_table.columns if c.startswith("train_")]
        for column in terms:
            style = {"lw": 2.2, "color": "black"} if column == "train_loss" else {"lw": 1.2}
            label = "total" if column == "train_loss" else column.removeprefix("train_")
            loss_axes.plot(epochs, log_table[column], label=label, **style)
        values = log_table[terms].to_numpy(dtype=np.float64) if terms else np.zeros(0)
        if values.size and np.all(values[np.isfinite(values)] > 0):
            loss_axes.set_yscale("log")  # terms differ by orders of magnitude
        loss_axes.set(xlabel="epoch", ylabel="training loss")
        loss_axes.set_title(f"{fold}: training loss terms")
        loss_axes.legend(fontsize="x-small", ncol=2, loc="best")
        for axes_ in (loss_axes, auc_axes):
            axes_.xaxis.set_major_locator(MaxNLocator(integer=True))
        for column, style in (("val_fine_auc", "-"), ("val_coarse_auc", "--")):
            if column in log_table:
                auc_axes.plot(epochs, log_table[column], ls=style, lw=1.5, label=column)
        best = best_epochs.get(fold)
        for axes_ in (loss_axes, auc_axes):
            if best is not None:
                axes_.axvline(best, color="red", lw=0.8, ls=":", label=None)
        auc_axes.set(xlabel="epoch", ylabel="validation AUC", ylim=(0, 1.02))
        suffix = f" (best epoch {best})" if best is not None else ""
        auc_axes.set_title(f"{fold}: validation AUC{suffix}")
        if auc_axes.lines:
            auc_axes.legend(fontsize="x-small", loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path, metadata)


def plot_class_auc_bars(
    path: Path,
    class_names: Sequence[str],
    runs: Mapping[str, Mapping[str, tuple[float, float, float]]],
    title: str,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Grouped bars: for each fine class, one bar per run (its pooled AUC with the 95% CI
    as error bar). ``runs``: run name → class name → (auc, ci_low, ci_high)."""
    figure, axes = new_figure(
        figsize=(max(6.0, 1.0 + 0.35 * len(class_names) * max(1, len(runs))), 4.8)
    )
    if not runs or not class_names:
        axes.axis("off")
        axes.text(0.5, 0.5, "no evaluated run to compare", ha="center", va="center")
        axes.set_title(title)
        save_figure(figure, path, metadata)
        return
    positions = np.arange(len(class_names))
    width = 0.8 / len(runs)
    for index, (run, class_values) in enumerate(runs.items()):
        values = np.array([class_values.get(c, (math.nan,) * 3) for c in class_names], dtype=float)
        auc, low, high = values.T
        errors = np.vstack([np.clip(auc - low, 0, None), np.clip(high - auc, 0, None)])
        errors = np.nan_to_num(errors)
        offset = positions - 0.4 + width * (index + 0.5)
        axes.bar(offset, np.nan_to_num(auc), width, yerr=errors, capsize=2, label=run)
        for x in offset[np.isnan(auc)]:
            axes.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize="x-small")
    axes.axhline(0.5, color="grey", lw=0.8, ls=":")
    axes.set_xticks(positions, labels=class_names, rotation=30, ha="right")
    axes.set(ylabel="pooled one-vs-rest AUC (95% CI)", ylim=(0, 1.05))
    axes.set_title(title)
    axes.legend(fontsize="small", loc="lower left", ncol=min(3, len(runs)))
    figure.tight_layout()
    save_figure(figure, path, metadata)
