"""The evaluate step's HTML report (hrnet.report): headline metrics, training curve, per-class table."""
import json
import re
from html.parser import HTMLParser

import pytest

from hrnet.errors import HrnetError
from hrnet.report import (
    UI_CONFUSION_LIMIT,
    curve_svg,
    markdown_summary,
    render,
    ui_confusion_matrix,
    weakest,
    write_report,
)


class Page(HTMLParser):
    """Collects table rows (as cell texts) and SVG polylines."""

    def __init__(self):
        super().__init__()
        self.rows, self.row_classes, self.polylines, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.rows.append([])
            self.row_classes.append(attrs.get("class", ""))
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "polyline":
            self.polylines.append([tuple(map(float, p.split(","))) for p in attrs["points"].split()])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def make_run(tmp_path, num_classes=8, steps=(10, 20, 30, 40)):
    checkpoint, evaluation = tmp_path / "ckpt", tmp_path / "eval"
    checkpoint.mkdir()
    evaluation.mkdir()
    (checkpoint / "manifest.json").write_text(json.dumps(
        {"kind": "checkpoint", "model": "w18_small_v1", "step": steps[-1], "image_size": 32, "precision": "fp32"}))
    with open(checkpoint / "history.jsonl", "w") as f:
        for i, step in enumerate(steps):
            line = {"step": step, "epoch": i / 2, "loss": 2.0 / (i + 1), "top1": 0.2 * i, "lr": 0.1}
            f.write(json.dumps(line) + "\n")
    per_class = {str(c): {"name": f"n0{c}", "text": f"digit {c}" if c else "<zero> & co", "count": 10,
                          "correct": c + 2, "top1": (c + 2) / 10} for c in range(num_classes)}
    (evaluation / "metrics.json").write_text(json.dumps(
        {"top1": 0.55, "top5": 0.975, "count": 10 * num_classes, "per_class": per_class}))
    return str(checkpoint), str(evaluation)


def test_report_shows_metrics_curve_and_every_class(tmp_path):
    checkpoint, evaluation = make_run(tmp_path)
    path = write_report(str(tmp_path / "out" / "report.html"), checkpoint=checkpoint, evaluation=evaluation)
    text = open(path, encoding="utf-8").read()
    assert "top-1 <b>55.00%</b>" in text and "top-5 <b>97.50%</b>" in text and "on 80 validation images" in text
    page = Page()
    page.feed(text)
    header, body = page.rows[0], page.rows[1:]
    assert header == ["#", "class", "name", "images", "top-1 %"]
    assert [row[0] for row in body] == [str(c) for c in range(8)]
    assert body[3] == ["3", "n03", "digit 3", "10", "50.00"]
    # Names are escaped, not interpreted as markup.
    assert body[0][2] == "<zero> & co" and "&lt;zero&gt; &amp; co" in text
    # The five weakest classes (0..4) are marked.
    assert [c for row, c in zip(body, page.row_classes[1:]) if c == "worst"] == ["worst"] * 5
    assert {row[0] for row, c in zip(body, page.row_classes[1:]) if c == "worst"} == {"0", "1", "2", "3", "4"}
    # Two curves (loss falling, top-1 rising), one point per logged step, left to right.
    loss, top1 = page.polylines
    assert len(loss) == len(top1) == 4
    assert [p[0] for p in loss] == sorted(p[0] for p in loss)
    assert loss[0][1] < loss[-1][1]  # SVG y grows downwards: a falling loss goes down the page
    assert top1[0][1] > top1[-1][1]


def test_report_without_history_says_so(tmp_path):
    checkpoint, evaluation = make_run(tmp_path, num_classes=3)
    (tmp_path / "ckpt" / "history.jsonl").unlink()
    text = render(checkpoint, evaluation)
    assert "no training history was logged" in text and "<svg" not in text
    assert "weakest" not in text  # three classes: nothing to single out
    assert curve_svg([{"step": 5, "loss": 1.0}]).count("<polyline") == 1


def test_missing_metrics_is_a_clear_error(tmp_path):
    checkpoint, evaluation = make_run(tmp_path)
    (tmp_path / "eval" / "metrics.json").unlink()
    with pytest.raises(HrnetError, match=re.escape("metrics.json is missing")):
        render(checkpoint, evaluation)


def test_weakest_classes_include_ties_and_never_a_perfect_one():
    rows = [{"index": i, "top1": t} for i, t in enumerate([1.0, 1.0, 0.5, 1.0, 0.7, 0.7, 0.7, 1.0, 0.9])]
    # Five asked for: 0.5, then the three at 0.7, then 0.9; none of the four at 100%.
    assert [r["index"] for r in weakest(rows, 5)] == [2, 4, 5, 6, 8]
    # Four asked for: the cut falls among the 0.7s, so all three come (ties included).
    assert [r["index"] for r in weakest(rows, 2)] == [2, 4, 5, 6]
    assert weakest([{"index": i, "top1": 1.0} for i in range(9)], 5) == []  # all perfect: none is weak


def _with_validation(tmp_path, num_classes=8):
    """make_run's folders plus validation lines, a best, and a real confusion matrix."""
    import numpy as np

    from hrnet.evaluate import class_metrics

    checkpoint, evaluation = make_run(tmp_path, num_classes=num_classes)
    with open(tmp_path / "ckpt" / "history.jsonl", "a") as f:
        for epoch, acc in ((0.5, 0.3), (1.0, 0.5), (1.5, 0.45)):
            f.write(json.dumps({"step": int(epoch * 20), "epoch": epoch, "val_top1": acc, "val_top5": 0.9}) + "\n")
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    manifest["best"] = {"step": 20, "epoch": 1.0, "val_top1": 0.5, "weights": "best"}
    (tmp_path / "ckpt" / "manifest.json").write_text(json.dumps(manifest))
    confusion = np.diag(np.full(num_classes, 8))
    confusion[3, 5], confusion[3, 3] = 6, 2  # class 3 is mostly taken for class 5
    confusion[1, 0], confusion[1, 1] = 1, 7
    names = [f"n0{c}" for c in range(num_classes)]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    metrics.update(class_metrics(confusion, names, [f"digit {c}" for c in range(num_classes)]),
                   weights="best", step=20)
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    return checkpoint, evaluation


def test_report_has_a_legend_the_validation_curve_on_epochs_and_the_most_confused(tmp_path):
    checkpoint, evaluation = _with_validation(tmp_path)
    text = render(checkpoint, evaluation)
    page = Page()
    page.feed(text)
    loss, top1, val = page.polylines
    assert len(val) == 3 and val[1][1] < val[0][1]  # rises from epoch 0.5 to 1 (y grows downwards)
    assert val[0][0] == pytest.approx(top1[1][0])  # epoch 0.5 is where the training line's epoch 0.5 is
    for legend in ("train loss", "train top-1", "validation top-1"):
        assert f">{legend}</text>" in text
    assert ">epoch</text>" in text and ">step</text>" not in text
    assert "best weights (step 20)" in text and "best validation top-1 50.00% at epoch 1" in text
    confused = next(i for i, row in enumerate(page.rows) if row[:2] == ["true class", "taken for"])
    assert page.rows[confused + 1] == ["n03 (digit 3)", "n05 (digit 5)", "6", "75.0"]
    assert page.rows[confused + 2] == ["n01 (digit 1)", "n00 (digit 0)", "1", "12.5"]


def test_markdown_summary_and_the_ui_confusion_matrix(tmp_path):
    checkpoint, evaluation = _with_validation(tmp_path, num_classes=12)
    md = markdown_summary(checkpoint, evaluation)
    assert "| n03 (digit 3) | n05 (digit 5) | 6 | 75.0 |" in md
    assert md.index("n03 (digit 3) | n05") < md.index("n01 (digit 1) | n00")
    weak = md[md.index("## Weakest classes"):].splitlines()[4:]
    assert weak == ["| 3 | n03 (digit 3) | 8 | 25.00 |", "| 1 | n01 (digit 1) | 8 | 87.50 |"]
    categories, rows = ui_confusion_matrix(json.loads((tmp_path / "eval" / "metrics.json").read_text()))
    assert categories == [f"n0{c}" for c in range(12)] and rows[3][5] == 6 and len(rows) == 12

    from kfp.dsl import ClassificationMetrics

    artifact = ClassificationMetrics(name="confusion")
    artifact.log_confusion_matrix(categories, rows)  # the shape KFP's artifact accepts
    assert artifact.metadata["confusionMatrix"]["rows"][3]["row"][5] == 6

    big = tmp_path / "big"
    big.mkdir()
    checkpoint, evaluation = _with_validation(big, num_classes=UI_CONFUSION_LIMIT + 1)
    assert ui_confusion_matrix(json.loads((big / "eval" / "metrics.json").read_text())) is None
