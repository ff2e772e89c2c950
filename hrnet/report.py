"""A one-page HTML report of a trained and evaluated checkpoint.

What the Kubeflow Pipelines UI shows for the evaluate step (an HTML artifact), readable in
any browser too: the headline metrics, the training curve from the checkpoint's
``history.jsonl`` (an inline SVG, no JavaScript and no network), and a per-class table from
the evaluation's ``metrics.json`` with the most-confused pairs; and the same in Markdown
(``markdown_summary``). Pure Python: no TensorFlow.
"""
import html
import json
import os
from typing import Any, Dict, List, Sequence, Tuple

from hrnet.errors import HrnetError
from hrnet.run_folder import HISTORY

METRICS = "metrics.json"
MANIFEST = "manifest.json"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.name { text-align: left; }
tr.worst td { background: #fff1f0; }
.headline { font-size: 1.3em; } .muted { color: #777; }
"""


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise HrnetError(f"cannot write the report: {path} is missing") from None


def read_history(checkpoint: str) -> List[Dict[str, float]]:
    """Every line of history.jsonl (training and validation), oldest first; [] when there is none."""
    path = os.path.join(checkpoint, HISTORY)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# (history key, legend, colour, axis): the curves the chart draws; loss on the left axis,
# accuracies on the right one (0..1).
CURVES = (("loss", "train loss", "#d9480f", "loss"), ("top1", "train top-1", "#1c7ed6", "accuracy"),
          ("val_top1", "validation top-1", "#2b8a3e", "accuracy"))


def curve_svg(history: Sequence[Dict[str, float]], width: int = 640, height: int = 260) -> str:
    """Training loss (left axis), training and validation top-1 (right axis, 0..1) against
    the epoch (the step when no epoch was logged), with a legend."""
    lines = {key: [(h.get("epoch", h["step"]), h[key]) for h in history if key in h and "step" in h]
             for key, *_ in CURVES}
    if not lines["loss"]:
        return '<p class="muted">no training history was logged</p>'
    axis = "epoch" if all("epoch" in h for h in history if "step" in h) else "step"
    left, right, top, bottom = 56, 48, 28, 32
    xs = [x for points in lines.values() for x, _ in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    losses = [v for _, v in lines["loss"]]
    lo, hi = min(losses), max(losses) if max(losses) > min(losses) else min(losses) + 1

    def x(value: float) -> float:
        return left + (value - x0) / (x1 - x0) * (width - left - right)

    def y(fraction: float) -> float:
        return top + (1.0 - fraction) * (height - top - bottom)

    shapes, legend = [], []
    for i, (key, name, color, scale) in enumerate(c for c in CURVES if lines[c[0]]):
        points = [(px, (v - lo) / (hi - lo) if scale == "loss" else v) for px, v in lines[key]]
        coords = " ".join(f"{x(px):.1f},{y(py):.1f}" for px, py in points)
        shapes.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
        if len(points) == 1:  # one validation: a dot, since a one-point line is invisible
            shapes.append(f'<circle cx="{x(points[0][0]):.1f}" cy="{y(points[0][1]):.1f}" r="3" fill="{color}"/>')
        lx = left + i * 150
        legend.append(f'<line x1="{lx}" y1="10" x2="{lx + 18}" y2="10" stroke="{color}" stroke-width="2"/>'
                      f'<text x="{lx + 22}" y="14" font-size="11">{html.escape(name)}</text>')
    text = [
        (left - 6, y(1), "end", f"{hi:.3g}"), (left - 6, y(0), "end", f"{lo:.3g}"),
        (width - right + 6, y(1), "start", "1.0"), (width - right + 6, y(0), "start", "0.0"),
        (x(x0), height - 10, "middle", f"{x0:g}"), (x(x1), height - 10, "middle", f"{x1:g}"),
        ((left + width - right) / 2, height - 10, "middle", axis),
    ]
    labels = "".join(f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}" font-size="11">'
                     f'{html.escape(s)}</text>' for tx, ty, anchor, s in text)
    frame = (f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             f'fill="none" stroke="#aaa"/>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="training loss, training and validation top-1 by {axis}">'
            f'{frame}{"".join(shapes)}{labels}{"".join(legend)}</svg>')


def per_class_rows(metrics: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per class (class index, name, readable text, count, top1), in class order.

    metrics.json's per_class maps the class index (0-based, as a string) to name (folder or
    synset), text, count, correct and top1.
    """
    rows = [dict(value, index=int(key)) for key, value in metrics.get("per_class", {}).items()]
    return sorted(rows, key=lambda r: r["index"])


def weakest(rows: Sequence[Dict[str, Any]], count: int = 5) -> List[Dict[str, Any]]:
    """The ``count`` classes with the lowest top-1, and any tied with the last of them, in
    class order; none at the best top-1 (when all are equal, none is weak), and none when
    there are no more than ``count`` classes to compare."""
    if len(rows) <= count:
        return []
    best = max(r["top1"] for r in rows)
    candidates = sorted((r for r in rows if r["top1"] < best), key=lambda r: r["top1"])
    if not candidates:
        return []
    cutoff = candidates[min(count, len(candidates)) - 1]["top1"]
    return [r for r in rows if r["top1"] <= cutoff and r["top1"] < best]


def _label(name: str, text: str) -> str:
    return f"{name} ({text})" if text and text != name else name


def confused_rows(metrics: Dict[str, Any], rows: Sequence[Dict[str, Any]],
                  top: int) -> List[Tuple[str, str, int, int]]:
    """(true class, predicted class, images, of images of the true class) of the most-confused pairs."""
    texts = {r["index"]: r.get("text", "") for r in rows}
    return [(_label(p["true_name"], texts.get(p["true"], "")),
             _label(p["predicted_name"], texts.get(p["predicted"], "")), p["count"], p["of"])
            for p in metrics.get("most_confused", [])[:top]]


def _facts(metrics: Dict[str, Any], manifest: Dict[str, Any]) -> str:
    facts = [f"{metrics.get('weights', 'last')} weights (step {metrics.get('step', manifest.get('step', '?'))})"]
    facts += [f"{k} {manifest[k]}" for k in ("image_size", "precision", "device") if k in manifest]
    best = manifest.get("best")
    if best:
        facts.append(f"best validation top-1 {100 * best['val_top1']:.2f}% at epoch {best['epoch']:g}")
    return ", ".join(facts)


def render(checkpoint: str, evaluation: str, worst: int = 5, pairs: int = 10) -> str:
    """The report's HTML for a checkpoint folder and its evaluation folder."""
    metrics = _read_json(os.path.join(evaluation, METRICS))
    manifest = _read_json(os.path.join(checkpoint, MANIFEST))
    rows = per_class_rows(metrics)
    shaded = {r["index"] for r in weakest(rows, worst)}
    table = "".join(
        f'<tr class="{"worst" if r["index"] in shaded else ""}"><td>{r["index"]}</td>'
        f'<td class="name">{html.escape(str(r.get("name", "")))}</td>'
        f'<td class="name">{html.escape(str(r.get("text", "")))}</td>'
        f'<td>{r["count"]}</td><td>{100 * r["top1"]:.2f}</td></tr>'
        for r in rows)
    note = f"the {len(shaded)} weakest classes are shaded (ties included)" if shaded else ""
    confused = "".join(f'<tr><td class="name">{html.escape(t)}</td><td class="name">{html.escape(p)}</td>'
                       f'<td>{n}</td><td>{100 * n / of:.1f}</td></tr>'
                       for t, p, n, of in confused_rows(metrics, rows, pairs))
    confused_section = (f'<h2>Most confused</h2><table><tr><th>true class</th><th>taken for</th><th>images</th>'
                        f'<th>% of the class</th></tr>{confused}</table>') if confused else ""
    model = html.escape(str(manifest.get("model", "?")))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>HRNet {model}: evaluation</title><style>{_STYLE}</style></head>
<body>
<h1>HRNet {model}</h1>
<p class="headline">top-1 <b>{100 * metrics["top1"]:.2f}%</b> &nbsp; top-5 <b>{100 * metrics["top5"]:.2f}%</b>
 &nbsp; on {metrics["count"]} validation images</p>
<p class="muted">{html.escape(_facts(metrics, manifest))}</p>
<h2>Training</h2>
{curve_svg(read_history(checkpoint))}
{confused_section}
<h2>Per class</h2>
<p class="muted">{note}</p>
<table><tr><th>#</th><th>class</th><th>name</th><th>images</th><th>top-1 %</th></tr>{table}</table>
</body></html>
"""


# Our limit, not KFP's: its UI draws a ClassificationMetrics confusion matrix as a table of
# every cell, which stops being readable well before ImageNet's million cells, and each
# cell goes into the artifact's metadata. Past it, the Markdown summary says what matters.
UI_CONFUSION_LIMIT = 50


def ui_confusion_matrix(metrics: Dict[str, Any]):
    """(categories, rows) for KFP's ClassificationMetrics.log_confusion_matrix from an
    evaluation's metrics, or None past UI_CONFUSION_LIMIT classes."""
    matrix = metrics["confusion_matrix"]
    if len(matrix["classes"]) > UI_CONFUSION_LIMIT:
        return None
    # The UI keys rows by category: names must be unique, so a repeated one gets its index.
    names = matrix["classes"]
    categories = [n if names.count(n) == 1 else f"{n} #{i}" for i, n in enumerate(names)]
    return categories, matrix["rows"]


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_summary(checkpoint: str, evaluation: str, worst: int = 10, pairs: int = 20) -> str:
    """The evaluation in Markdown (the KFP UI renders a Markdown artifact): headline, the
    most-confused pairs and the weakest classes; readable for ImageNet's 1000 classes,
    where a confusion-matrix view is not."""
    metrics = _read_json(os.path.join(evaluation, METRICS))
    manifest = _read_json(os.path.join(checkpoint, MANIFEST))
    rows = per_class_rows(metrics)
    out = [f"# HRNet {_md(manifest.get('model', '?'))}", "",
           f"**top-1 {100 * metrics['top1']:.2f}%**, top-5 {100 * metrics['top5']:.2f}% on {metrics['count']} "
           f"{_md(metrics.get('split', 'validation'))} images; {_md(_facts(metrics, manifest))}.", ""]
    confused = confused_rows(metrics, rows, pairs)
    if confused:
        out += ["## Most confused", "", "| true class | taken for | images | % of the class |", "|---|---|---:|---:|"]
        out += [f"| {_md(t)} | {_md(p)} | {n} | {100 * n / of:.1f} |" for t, p, n, of in confused]
        out.append("")
    weak = sorted(weakest(rows, worst), key=lambda r: (r["top1"], r["index"]))
    if weak:
        out += ["## Weakest classes", "", "| # | class | images | top-1 % |", "|---:|---|---:|---:|"]
        out += [f"| {r['index']} | {_md(_label(r.get('name', ''), r.get('text', '')))} | {r['count']} | "
                f"{100 * r['top1']:.2f} |" for r in weak]
        out.append("")
    return "\n".join(out)


def write_report(path: str, checkpoint: str, evaluation: str, markdown: bool = False) -> str:
    """Write the report of ``checkpoint`` evaluated in ``evaluation`` to the file ``path``
    (HTML; with ``markdown``, the Markdown summary)."""
    page = markdown_summary(checkpoint, evaluation) if markdown else render(checkpoint, evaluation)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
