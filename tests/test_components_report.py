"""The evaluate step's HTML report (hrnet.report): headline metrics, training curve, per-class table."""
import json
import re
from html.parser import HTMLParser

import pytest

from hrnet.errors import HrnetError
from hrnet.report import curve_svg, render, write_report


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
