"""The report's figures, drawn by matplotlib: the training curves, the confusion matrix and
the per-class accuracy, each built as a Figure (what tests inspect) and written as inline SVG
(what the report embeds: the KFP UI shows an HTML artifact alone, so nothing may be a
separate file).

Matplotlib's object API only (no pyplot): no global figure state and no display backend.
It runs in every step image, the Ascend one's older matplotlib (for its numpy 1.19) too.
"""
import io
from typing import Any, Dict, List, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

# Text stays text in the SVG (searchable, and smaller than glyph paths); ids are the same
# from run to run; a light grid on every axis.
STYLE = {"svg.fonttype": "none", "svg.hashsalt": "hrnet", "axes.grid": True, "grid.alpha": 0.35,
         "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold"}
# Up to this many classes, the confusion matrix and the accuracy chart name every class;
# past it they are drawn as a picture of the whole (ImageNet's 1000 classes).
NAMED_CLASSES = 30
TRAIN, VALIDATION, ACCENT = "#1c7ed6", "#2b8a3e", "#d9480f"


# rc settings apply when artists are made (the grid) or when saved (the SVG's): both under it.
styled = matplotlib.rc_context(STYLE)


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


@styled
def to_svg(figure: Figure) -> str:
    """``figure`` as an <svg> element to put in a page (no XML prolog, no creation date)."""
    out = io.StringIO()
    figure.savefig(out, format="svg", metadata={"Date": None})
    text = out.getvalue()
    return text[text.index("<svg"):]


def _series(history: Sequence[Dict[str, Any]], key: str, x_key: str):
    points = [(h[x_key], h[key]) for h in history if key in h and x_key in h]
    return [p[0] for p in points], [p[1] for p in points]


@styled
def training_curves(history: Sequence[Dict[str, Any]], best: Optional[Dict[str, Any]] = None):
    """Loss, top-1 (training and validation, %) and the learning rate, in three panels over
    a shared epoch axis (the step where no epoch was logged); the best validation starred.
    None when no training was logged."""
    train = [h for h in history if "loss" in h and "step" in h]
    if not train:
        return None
    x_key = "epoch" if all("epoch" in h for h in history if "step" in h) else "step"
    marker = "." if len(train) <= 60 else None
    figure = _figure(7.5, 6.4)
    loss, accuracy, lr = figure.subplots(3, 1, sharex=True)
    loss.plot(*_series(train, "loss", x_key), color=ACCENT, marker=marker, label="training loss")
    loss.set(ylabel="loss", title="Loss")
    xs, top1 = _series(train, "top1", x_key)
    accuracy.plot(xs, [100 * v for v in top1], color=TRAIN, marker=marker, label="training top-1")
    xs, val = _series(history, "val_top1", x_key)
    if xs:
        accuracy.plot(xs, [100 * v for v in val], color=VALIDATION, marker="o", linestyle="--",
                      label="validation top-1")
        if best and x_key in best:
            accuracy.plot([best[x_key]], [100 * best["val_top1"]], color=VALIDATION, marker="*", markersize=14,
                          linestyle="none", label=f"best: {100 * best['val_top1']:.2f}%")
    accuracy.set(ylabel="top-1 (%)", title="Accuracy")
    accuracy.legend(loc="lower right")
    xs, rates = _series(train, "lr", x_key)
    lr.plot(xs, rates, color="#5f3dc4", marker=marker)
    lr.set(ylabel="learning rate", xlabel=x_key, title="Learning rate")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    return figure


@styled
def confusion_heatmap(rows: Sequence[Sequence[int]], names: List[str]):
    """Each true class's images by predicted class, as % of the true class (rows sum to 100).
    Up to NAMED_CLASSES classes: named, with the counts written in when they fit; past it,
    a log colour scale, so that the few stray images of 1000 classes still show."""
    counts = np.asarray(rows, dtype=np.float64)
    share = 100 * counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(names)
    side = min(7.5, 2.8 + 0.28 * n)
    figure = _figure(side + 1.2, side)
    ax = figure.subplots()
    ax.grid(False)
    if n <= NAMED_CLASSES:
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
        ax.set_xticks(range(n))
        ax.set_xticklabels(names, rotation=90)
        ax.set_yticks(range(n))
        ax.set_yticklabels(names)
        if n <= 15:
            for (t, p), count in np.ndenumerate(counts):
                if count:
                    ax.text(p, t, f"{count:g}", ha="center", va="center", fontsize=7,
                            color="white" if share[t, p] > 60 else "#222")
    else:
        shown = np.ma.masked_equal(share, 0)
        floor = max(float(shown.min()) if shown.count() else 1.0, 0.01)
        image = ax.imshow(shown, cmap="magma_r", norm=LogNorm(vmin=floor, vmax=100), interpolation="antialiased")
        ax.set_facecolor("white")
    ax.set(xlabel="predicted class", ylabel="true class", title=f"Confusion matrix ({n} classes)")
    figure.colorbar(image, ax=ax, shrink=0.8, label="% of the true class's images")
    return figure


@styled
def class_accuracy(per_class: Sequence[Dict[str, Any]], overall: float):
    """Top-1 of each class (a bar each, in class order, up to NAMED_CLASSES), or past it how
    many classes reach each accuracy (a histogram); the overall top-1 as a line."""
    values = [100 * r["top1"] for r in per_class]
    if len(per_class) <= NAMED_CLASSES:
        figure = _figure(7.5, 1.2 + 0.24 * len(per_class))
        ax = figure.subplots()
        names = [str(r.get("name", r["index"])) for r in per_class]
        ax.barh(range(len(values)), values, color=TRAIN)
        ax.set_yticks(range(len(values)))
        ax.set_yticklabels(names)
        ax.invert_yaxis()  # class 0 on top, as in the table
        ax.set(xlabel="top-1 (%)", xlim=(0, 100), title="Top-1 by class")
    else:
        figure = _figure(7.5, 3.2)
        ax = figure.subplots()
        ax.hist(values, bins=[5 * i for i in range(21)], color=TRAIN, edgecolor="white")
        ax.set(xlabel="top-1 of a class (%)", ylabel="classes", xlim=(0, 100),
               title=f"Top-1 by class ({len(values)} classes)")
    ax.axvline(100 * overall, color=ACCENT, linestyle="--", label=f"overall {100 * overall:.2f}%")
    ax.legend(loc="lower right" if len(per_class) <= NAMED_CLASSES else "upper left")
    return figure

