"""A one-page HTML report of a trained and evaluated checkpoint.

What the Kubeflow Pipelines UI shows for the evaluate step (an HTML artifact, shown alone:
everything is inline, with no JavaScript and no network), readable in any browser too: the
headline metrics, the run's settings and duration, the training curves from the checkpoint's
``history.jsonl``, the confusion matrix, the accuracy by class, the most confident mistakes
as thumbnails and the per-class table, from the evaluation's ``metrics.json``; and a shorter
Markdown summary (``markdown_summary``). The figures are matplotlib's (hrnet.figures). No
TensorFlow.
"""
import base64
import html
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hrnet.errors import HrnetError
from hrnet.run_folder import CONFIG_FILE, HISTORY, read_history

METRICS = "metrics.json"
MANIFEST = "manifest.json"
# Past this many classes the per-class table lists only the weakest (all are in metrics.json).
TABLE_ROWS = 100

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 64em; padding: 0 1em; color: #222; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
tr.worst td { background: #fff1f0; }
figure { margin: 0.5em 0 1em; } figure svg { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; }
.mistakes { display: flex; flex-wrap: wrap; gap: 0.8em; }
.mistakes figure { width: 8.5em; margin: 0; }
.mistakes img { width: 8.5em; height: 8.5em; object-fit: contain; image-rendering: pixelated; background: #eee; }
.headline { font-size: 1.3em; } .muted { color: #777; }
"""


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise HrnetError(f"cannot write the report: {path} is missing") from None


def read_config(checkpoint: str) -> Dict[str, Any]:
    """The run's train_config.yaml ({} for imported weights, which have none)."""
    import yaml

    path = os.path.join(checkpoint, CONFIG_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return yaml.safe_load(f) or {}


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


def _weights(metrics: Dict[str, Any], manifest: Dict[str, Any]) -> str:
    """Which weights were evaluated: "best weights (step 90)"."""
    return f"{metrics.get('weights', 'last')} weights (step {metrics.get('step', manifest.get('step', '?'))})"


def _facts(metrics: Dict[str, Any], manifest: Dict[str, Any]) -> str:
    facts = [_weights(metrics, manifest)]
    facts += [f"{k} {manifest[k]}" for k in ("image_size", "precision", "device") if k in manifest]
    best = manifest.get("best")
    if best:
        facts.append(f"best validation top-1 {100 * best['val_top1']:.2f}% at epoch {best['epoch']:g}")
    return ", ".join(facts)


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def settings(metrics: Dict[str, Any], manifest: Dict[str, Any], config: Dict[str, Any],
             history: Sequence[Dict[str, Any]]) -> List[Tuple[str, str]]:
    """(setting, value) of the run, for what it knows: imported weights know little."""
    peak_lr = max((h["lr"] for h in history if "lr" in h), default=None)
    replicas = manifest.get("num_replicas")
    rows = [
        ("model", f"{manifest.get('model', '?')}" + (f", {manifest['params'] / 1e6:.2f} M parameters"
                                                      if manifest.get("params") else "")),
        ("classes", manifest.get("num_classes")),
        ("image size", manifest.get("image_size")),
        ("device", f"{manifest['device']}" + (f" x {replicas}" if replicas else "") if "device" in manifest else None),
        ("precision", manifest.get("precision")),
        ("batch", f"{manifest['global_batch_size']} images per step" if "global_batch_size" in manifest else None),
        ("trained", f"step {manifest['step']} of {manifest.get('train_steps', '?')}" +
         (f", {manifest['epochs']:g} epochs" if manifest.get("epochs") else "") if "train_steps" in manifest else None),
        ("learning rate", (", ".join(filter(None, (config.get("schedule"), f"peak {peak_lr:.4g}"))) +
                           (f", {config['warmup_epochs']:g} warmup epochs" if config.get("warmup_epochs") else ""))
         if peak_lr is not None else None),
        ("optimizer", (f"SGD, momentum {config['momentum']:g}{' (Nesterov)' if config.get('nesterov') else ''}, "
                       f"weight decay {config.get('weight_decay', 0):g}, label smoothing "
                       f"{config.get('label_smoothing', 0):g}") if "momentum" in config else None),
        ("seed", config.get("seed")),
        ("training time", _duration(manifest.get("seconds")) or None),
        ("evaluated", f"{metrics['count']} {metrics.get('split', 'validation')} images, {_weights(metrics, manifest)}"
                      + (f" in {_duration(metrics['seconds'])}" if metrics.get("seconds") is not None else "")),
        ("software", ", ".join(f"{k} {manifest[k]}" for k in ("tensorflow", "keras") if k in manifest) or None),
    ]
    return [(k, str(v)) for k, v in rows if v is not None]


def _figure_html(figure, caption: str, anchor: str) -> str:
    from hrnet.figures import to_svg

    return f'<figure id="{anchor}">{to_svg(figure)}<figcaption>{html.escape(caption)}</figcaption></figure>'


def _data_uri(path: str) -> Optional[str]:
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def mistakes_html(metrics: Dict[str, Any], rows: Sequence[Dict[str, Any]], evaluation: str) -> str:
    """The most confident mistakes: each thumbnail with its true and predicted class."""
    texts = {r["index"]: r.get("text", "") for r in rows}
    cells = []
    for m in metrics.get("mistakes", []):
        uri = _data_uri(os.path.join(evaluation, m["image"]))
        if uri is None:  # an evaluation without its thumbnails (evaluated with no --out)
            continue
        true = _label(m["true_name"], texts.get(m["true"], ""))
        predicted = _label(m["predicted_name"], texts.get(m["predicted"], ""))
        cells.append(f'<figure><img src="{uri}" alt="{html.escape(true)}, taken for {html.escape(predicted)}">'
                     f'<figcaption><b>{html.escape(true)}</b><br>taken for {html.escape(predicted)} '
                     f'({100 * m["probability"]:.1f}%)</figcaption></figure>')
    if not cells:
        return ""
    return ('<h2>Most confident mistakes</h2><p class="muted">The misclassified validation images the model was '
            'surest about (lowest probability of the true class): true class, what it was taken for, and '
            f'with what probability.</p><div class="mistakes" id="mistakes">{"".join(cells)}</div>')


def render(checkpoint: str, evaluation: str, worst: int = 5, pairs: int = 10) -> str:
    """The report's HTML for a checkpoint folder and its evaluation folder."""
    from hrnet import figures

    metrics = _read_json(os.path.join(evaluation, METRICS))
    manifest = _read_json(os.path.join(checkpoint, MANIFEST))
    history = read_history(os.path.join(checkpoint, HISTORY))
    rows = per_class_rows(metrics)
    shaded = {r["index"] for r in weakest(rows, worst)}
    numbered = any(str(r.get("name", "")) != str(r["index"]) for r in rows)  # else "#" repeats the name
    ranked = sorted(rows, key=lambda r: (r["top1"], r["index"]))
    listed = ranked[:TABLE_ROWS // 2] if len(rows) > TABLE_ROWS else ranked
    table = "".join(
        f'<tr class="{"worst" if r["index"] in shaded else ""}">' + (f'<td>{r["index"]}</td>' if numbered else "") +
        f'<td class="name">{html.escape(_label(str(r.get("name", "")), str(r.get("text", ""))))}</td>'
        f'<td>{r["count"]}</td><td>{r.get("correct", round(r["top1"] * r["count"]))}</td>'
        f'<td>{100 * r["top1"]:.2f}</td></tr>'
        for r in listed)
    notes = [f"weakest first; the {len(shaded)} weakest are shaded (ties included)" if shaded else "weakest first"]
    if len(listed) < len(rows):
        notes.append(f"the {len(listed)} weakest of {len(rows)} classes: all are in metrics.json")
    confused = "".join(f'<tr><td class="name">{html.escape(t)}</td><td class="name">{html.escape(p)}</td>'
                       f'<td>{n}</td><td>{100 * n / of:.1f}</td></tr>'
                       for t, p, n, of in confused_rows(metrics, rows, pairs))
    confused_section = (f'<h2>Most confused classes</h2><table id="confused"><tr><th class="name">true class</th>'
                        f'<th class="name">taken for</th><th>images</th><th>% of the class</th></tr>{confused}</table>'
                        ) if confused else ""
    curves = figures.training_curves(history, manifest.get("best"))
    training = (_figure_html(curves, "Training loss and top-1 (averaged over each logging window), validation top-1 "
                                     "(the star: the best, whose weights are kept) and the learning rate.", "curves")
                if curves is not None else '<p class="muted">no training history was logged</p>')
    charts = ""
    matrix = metrics.get("confusion_matrix")
    if matrix:
        charts += _figure_html(figures.confusion_heatmap(matrix["rows"], matrix["classes"]),
                               "Rows: the true class; columns: the class predicted (top-1); colour: the share of "
                               "the true class's images.", "confusion")
    if rows:
        charts += _figure_html(figures.class_accuracy(rows, metrics["top1"]), "Top-1 of each class's images.",
                               "classes")
    settings_rows = "".join(f'<tr><th class="name">{html.escape(k)}</th><td class="name">{html.escape(v)}</td></tr>'
                            for k, v in settings(metrics, manifest, read_config(checkpoint), history))
    model = html.escape(str(manifest.get("model", "?")))
    header = ('<tr>' + ('<th>#</th>' if numbered else '') +
              '<th class="name">class</th><th>images</th><th>correct</th><th>top-1 %</th></tr>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>HRNet {model}: evaluation</title><style>{_STYLE}</style></head>
<body>
<h1>HRNet {model}</h1>
<p class="headline">top-1 <b>{100 * metrics["top1"]:.2f}%</b> &nbsp; top-5 <b>{100 * metrics["top5"]:.2f}%</b>
 &nbsp; on {metrics["count"]} {html.escape(str(metrics.get("split", "validation")))} images</p>
<p class="muted">{html.escape(_facts(metrics, manifest))}</p>
<h2>Run</h2>
<table id="settings">{settings_rows}</table>
<h2>Training</h2>
{training}
<h2>Evaluation</h2>
{charts}
{mistakes_html(metrics, rows, evaluation)}
{confused_section}
<h2>Per class</h2>
<p class="muted">{html.escape("; ".join(notes))}</p>
<table id="per-class">{header}{table}</table>
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
