"""A one-page HTML report of a trained and evaluated checkpoint.

What the Kubeflow Pipelines UI shows for the evaluate step (an HTML artifact), readable in
any browser too: the headline metrics, the training curve from the checkpoint's
``history.jsonl`` (an inline SVG, no JavaScript and no network), and a per-class table from
the evaluation's ``metrics.json``. Pure Python: no TensorFlow.
"""
import html
import json
import os
from typing import Any, Dict, List, Sequence, Tuple

from hrnet.errors import HrnetError

HISTORY = "history.jsonl"
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
    """The logged training steps (history.jsonl), oldest first; [] when there are none."""
    path = os.path.join(checkpoint, HISTORY)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curve_svg(history: Sequence[Dict[str, float]], width: int = 640, height: int = 240) -> str:
    """Training loss (left axis) and training top-1 (right axis, 0..1) against the step."""
    points = [h for h in history if "step" in h and "loss" in h]
    if not points:
        return '<p class="muted">no training history was logged</p>'
    left, right, top, bottom = 56, 48, 12, 32
    steps = [p["step"] for p in points]
    losses = [p["loss"] for p in points]
    x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    lo, hi = min(losses), max(losses) if max(losses) > min(losses) else min(losses) + 1

    def x(step: float) -> float:
        return left + (step - x0) / (x1 - x0) * (width - left - right)

    def y(fraction: float) -> float:
        return top + (1.0 - fraction) * (height - top - bottom)

    def polyline(values: List[Tuple[float, float]], color: str) -> str:
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in values)
        return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>'

    loss_line = polyline([(s, (v - lo) / (hi - lo)) for s, v in zip(steps, losses)], "#d9480f")
    acc = [(p["step"], p["top1"]) for p in points if "top1" in p]
    acc_line = polyline(acc, "#1c7ed6") if acc else ""
    text = [
        (left - 6, y(1), "end", f"{hi:.3g}"), (left - 6, y(0), "end", f"{lo:.3g}"),
        (width - right + 6, y(1), "start", "1.0"), (width - right + 6, y(0), "start", "0.0"),
        (x(x0), height - 10, "middle", f"{x0:g}"), (x(x1), height - 10, "middle", f"{x1:g}"),
        ((left + width - right) / 2, height - 10, "middle", "step"),
        (left, top - 2, "start", "loss"), (width - right, top - 2, "end", "train top-1"),
    ]
    labels = "".join(f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}" font-size="11">'
                     f'{html.escape(s)}</text>' for tx, ty, anchor, s in text)
    frame = (f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             f'fill="none" stroke="#aaa"/>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="training loss and top-1 by step">{frame}{loss_line}{acc_line}{labels}</svg>')


def per_class_rows(metrics: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per class (class index, name, readable text, count, top1), in class order.

    metrics.json's per_class maps the class index (0-based, as a string) to name (folder or
    synset), text, count, correct and top1.
    """
    rows = [dict(value, index=int(key)) for key, value in metrics.get("per_class", {}).items()]
    return sorted(rows, key=lambda r: r["index"])


def render(checkpoint: str, evaluation: str, worst: int = 5) -> str:
    """The report's HTML for a checkpoint folder and its evaluation folder."""
    metrics = _read_json(os.path.join(evaluation, METRICS))
    manifest = _read_json(os.path.join(checkpoint, MANIFEST))
    rows = per_class_rows(metrics)
    # Shading the weakest classes only says something when there are others to compare with.
    weakest = {r["index"] for r in sorted(rows, key=lambda r: r["top1"])[:worst]} if len(rows) > worst else set()
    table = "".join(
        f'<tr class="{"worst" if r["index"] in weakest else ""}"><td>{r["index"]}</td>'
        f'<td class="name">{html.escape(str(r.get("name", "")))}</td>'
        f'<td class="name">{html.escape(str(r.get("text", "")))}</td>'
        f'<td>{r["count"]}</td><td>{100 * r["top1"]:.2f}</td></tr>'
        for r in rows)
    note = f"the {len(weakest)} weakest classes are shaded" if weakest else ""
    model = html.escape(str(manifest.get("model", "?")))
    facts = ", ".join(f"{k} {html.escape(str(manifest[k]))}" for k in ("step", "image_size", "precision", "device")
                      if k in manifest)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>HRNet {model}: evaluation</title><style>{_STYLE}</style></head>
<body>
<h1>HRNet {model}</h1>
<p class="headline">top-1 <b>{100 * metrics["top1"]:.2f}%</b> &nbsp; top-5 <b>{100 * metrics["top5"]:.2f}%</b>
 &nbsp; on {metrics["count"]} validation images</p>
<p class="muted">{facts}</p>
<h2>Training</h2>
{curve_svg(read_history(checkpoint))}
<h2>Per class</h2>
<p class="muted">{note}</p>
<table><tr><th>#</th><th>class</th><th>name</th><th>images</th><th>top-1 %</th></tr>{table}</table>
</body></html>
"""


def write_report(path: str, checkpoint: str, evaluation: str) -> str:
    """Write the report of ``checkpoint`` evaluated in ``evaluation`` to the file ``path``."""
    page = render(checkpoint, evaluation)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
