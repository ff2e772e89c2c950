"""The evaluate step's HTML report (hrnet.report, its figures hrnet.figures): headline
metrics, run settings, training curves, confusion matrix, accuracy by class, the most
confident mistakes and the per-class table; checked as data, and as drawn by Chromium."""
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from hrnet import figures
from hrnet.errors import HrnetError
from hrnet.report import (
    TABLE_ROWS,
    UI_CONFUSION_LIMIT,
    markdown_summary,
    render,
    ui_confusion_matrix,
    weakest,
    write_report,
)


class Page(HTMLParser):
    """Collects table rows (as cell texts, by table id), figure ids and image sources."""

    def __init__(self):
        super().__init__()
        self.tables, self.figures, self.images, self._cell, self._table = {}, [], [], None, None
        self.rows, self.row_classes = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr":
            self._table.append([])
            self.rows.append(self._table[-1])
            self.row_classes.append(attrs.get("class", ""))
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "figure" and "id" in attrs:
            self.figures.append(attrs["id"])
        elif tag == "img":
            self.images.append(attrs)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._table[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def parse(text):
    page = Page()
    page.feed(text)
    return page


# The top-1 of class c is ORDER[c] / 10: not in class order, so that sorting shows.
ORDER = (2, 7, 4, 9, 6, 3, 8, 5)


def make_run(tmp_path, num_classes=8, steps=(10, 20, 30, 40)):
    checkpoint, evaluation = tmp_path / "ckpt", tmp_path / "eval"
    checkpoint.mkdir()
    evaluation.mkdir()
    (checkpoint / "manifest.json").write_text(json.dumps(
        {"kind": "checkpoint", "model": "w18_small_v1", "step": steps[-1], "train_steps": steps[-1], "epochs": 2,
         "image_size": 32, "precision": "fp32", "device": "cpu", "num_replicas": 1, "global_batch_size": 16,
         "params": 1234567, "num_classes": num_classes, "seconds": 3725.4}))
    (checkpoint / "train_config.yaml").write_text("schedule: cosine\nmomentum: 0.9\nnesterov: true\n"
                                                  "weight_decay: 0.0001\nlabel_smoothing: 0.1\nseed: 7\n")
    with open(checkpoint / "history.jsonl", "w") as f:
        for i, step in enumerate(steps):
            line = {"step": step, "epoch": i / 2, "loss": 2.0 / (i + 1), "top1": 0.2 * i, "lr": 0.1 / (i + 1)}
            f.write(json.dumps(line) + "\n")
    correct = [ORDER[c % len(ORDER)] for c in range(num_classes)]
    per_class = {str(c): {"name": f"n0{c}", "text": f"digit {c}" if c else "<zero> & co", "count": 10,
                          "correct": correct[c], "top1": correct[c] / 10} for c in range(num_classes)}
    (evaluation / "metrics.json").write_text(json.dumps(
        {"top1": 0.55, "top5": 0.975, "count": 10 * num_classes, "per_class": per_class, "seconds": 75}))
    return str(checkpoint), str(evaluation)


def test_report_shows_metrics_settings_and_every_class_weakest_first(tmp_path):
    checkpoint, evaluation = make_run(tmp_path)
    path = write_report(str(tmp_path / "out" / "report.html"), checkpoint=checkpoint, evaluation=evaluation)
    text = open(path, encoding="utf-8").read()
    assert "top-1 <b>55.00%</b>" in text and "top-5 <b>97.50%</b>" in text and "on 80 validation images" in text
    page = parse(text)
    settings = dict(page.tables["settings"])
    assert settings["model"] == "w18_small_v1, 1.23 M parameters" and settings["device"] == "cpu x 1"
    assert settings["trained"] == "step 40 of 40, 2 epochs" and settings["training time"] == "1:02:05"
    assert settings["learning rate"] == "cosine, peak 0.1" and settings["seed"] == "7"
    assert settings["optimizer"] == "SGD, momentum 0.9 (Nesterov), weight decay 0.0001, label smoothing 0.1"
    assert settings["evaluated"] == "80 validation images, last weights (step 40) in 1:15"
    header, *body = page.tables["per-class"]
    assert header == ["#", "class", "images", "correct", "top-1 %"]
    # Weakest first: class 0 (20%), then 5 (30%), 2, 7, 4, 1, 6 and 3 (90%).
    assert [row[0] for row in body] == ["0", "5", "2", "7", "4", "1", "6", "3"]
    assert body[-1] == ["3", "n03 (digit 3)", "10", "9", "90.00"]
    # Names are escaped, not interpreted as markup.
    assert body[0][1] == "n00 (<zero> & co)" and "&lt;zero&gt; &amp; co" in text
    # The five weakest classes are shaded.
    shaded = [row[0] for row, c in zip(page.rows, page.row_classes) if c == "worst"]
    assert shaded == ["0", "5", "2", "7", "4"]
    assert page.figures == ["curves", "classes"]  # no confusion matrix in these metrics
    assert "<?xml" not in text and text.count("<svg") == 2


def test_the_class_number_is_left_out_where_it_is_the_name(tmp_path):
    checkpoint, evaluation = make_run(tmp_path, num_classes=3)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key, row in metrics["per_class"].items():
        row["name"], row["text"] = key, ""
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    header, *body = parse(render(checkpoint, evaluation)).tables["per-class"]
    assert header == ["class", "images", "correct", "top-1 %"] and body[0] == ["0", "10", "2", "20.00"]


def test_training_curves_are_three_labelled_gridded_panels():
    history = [{"step": s, "epoch": s / 20, "loss": 3 - s / 20, "top1": s / 100, "lr": 0.1 if s < 30 else 0.01}
               for s in (10, 20, 30, 40)]
    history.insert(2, {"step": 20, "epoch": 1.0, "val_top1": 0.25, "val_top5": 0.8})
    history.append({"step": 40, "epoch": 2.0, "val_top1": 0.5, "val_top5": 0.9})
    figure = figures.training_curves(history, best={"step": 40, "epoch": 2.0, "val_top1": 0.5})
    loss, accuracy, lr = figure.axes
    assert [ax.get_ylabel() for ax in figure.axes] == ["loss", "top-1 (%)", "learning rate"]
    assert lr.get_xlabel() == "epoch"
    assert all(any(line.get_visible() for line in ax.get_ygridlines()) for ax in figure.axes)
    assert loss.lines[0].get_xydata().tolist() == [[0.5, 2.5], [1.0, 2.0], [1.5, 1.5], [2.0, 1.0]]
    train, validation, best = accuracy.lines
    assert train.get_ydata().tolist() == [10, 20, 30, 40]  # in %, as the headline
    assert validation.get_xydata().tolist() == [[1.0, 25.0], [2.0, 50.0]]
    assert best.get_xydata().tolist() == [[2.0, 50.0]] and best.get_marker() == "*"
    assert [t.get_text() for t in accuracy.get_legend().get_texts()] == [
        "training top-1", "validation top-1", "best: 50.00%"]
    assert lr.lines[0].get_ydata().tolist() == [0.1, 0.1, 0.01, 0.01]
    svg = figures.to_svg(figure)
    labels = re.findall(r"<text[^>]*>([^<]*)</text>", svg)  # text stays text
    assert {"loss", "top-1 (%)", "learning rate", "epoch", "validation top-1"} <= set(labels), labels
    # Without epochs the axis is the step.
    steps = figures.training_curves([{"step": 5, "loss": 1.0, "top1": 0.1, "lr": 0.1}])
    assert steps.axes[2].get_xlabel() == "step"


def test_confusion_and_class_accuracy_readable_for_10_and_1000_classes():
    rows = np.diag(np.full(10, 8))
    rows[3, 3], rows[3, 5] = 2, 6
    names = [f"n0{c}" for c in range(10)]
    figure = figures.confusion_heatmap(rows.tolist(), names)
    (ax, _colorbar) = figure.axes
    shown = ax.images[0].get_array()
    assert shown[3, 5] == 75 and shown[3, 3] == 25 and shown[0, 0] == 100  # % of the true class
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert sorted(t.get_text() for t in ax.texts) == sorted(["8"] * 9 + ["2", "6"])  # counts written in
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    per_class = [{"index": c, "name": names[c], "top1": 0.5 + c / 20} for c in range(10)]
    bars = figures.class_accuracy(per_class, overall=0.7).axes[0]
    assert [p.get_width() for p in bars.patches] == pytest.approx([50 + 5 * c for c in range(10)])

    big = np.diag(np.full(1000, 40))
    big[7, 7], big[7, 9] = 30, 10
    figure = figures.confusion_heatmap(big.tolist(), [f"n{c}" for c in range(1000)])
    ax = figure.axes[0]
    assert not ax.texts and len(ax.get_yticklabels()) < 20  # a picture of the whole, not 1000 names
    assert ax.images[0].get_array()[7, 9] == 25 and ax.images[0].norm.vmin == 25  # log scale from the least
    assert figure.get_size_inches()[0] <= 9
    per_class = [{"index": c, "name": str(c), "top1": (c % 10) / 10} for c in range(1000)]
    histogram = figures.class_accuracy(per_class, overall=0.45).axes[0]
    assert len(histogram.patches) == 20 and sum(p.get_height() for p in histogram.patches) == 1000
    assert histogram.get_ylabel() == "classes"


def test_report_without_history_says_so(tmp_path):
    checkpoint, evaluation = make_run(tmp_path, num_classes=3)
    (tmp_path / "ckpt" / "history.jsonl").unlink()
    text = render(checkpoint, evaluation)
    assert "no training history was logged" in text and parse(text).figures == ["classes"]
    assert "weakest are shaded" not in text  # three classes: nothing to single out
    assert figures.training_curves([]) is None


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


def test_report_has_the_confusion_matrix_the_most_confused_and_the_mistakes(tmp_path):
    from PIL import Image

    checkpoint, evaluation = _with_validation(tmp_path)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    metrics["mistakes"] = [{"true": 3, "true_name": "n03", "predicted": 5, "predicted_name": "n05",
                            "probability": 0.91, "true_probability": 0.02, "image": "mistake-01.png"}]
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "eval" / "mistake-01.png")
    text = render(checkpoint, evaluation)
    page = parse(text)
    assert page.figures == ["curves", "confusion", "classes"]
    assert "best weights (step 20)" in text and "best validation top-1 50.00% at epoch 1" in text
    confused = page.tables["confused"]
    assert confused[0][:2] == ["true class", "taken for"]
    assert confused[1] == ["n03 (digit 3)", "n05 (digit 5)", "6", "75.0"]
    assert confused[2] == ["n01 (digit 1)", "n00 (digit 0)", "1", "12.5"]
    (image,) = page.images  # inline: the KFP UI shows the page alone
    assert image["src"].startswith("data:image/png;base64,")
    assert image["alt"] == "n03 (digit 3), taken for n05 (digit 5)"
    assert "taken for n05 (digit 5) (91.0%)" in text
    (tmp_path / "eval" / "mistake-01.png").unlink()  # evaluated without --out: no thumbnails, no section
    assert "Most confident mistakes" not in render(checkpoint, evaluation)


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


def test_the_mistakes_kept_are_the_surest_wrong_ones_as_thumbnails():
    from hrnet.data.input import MEAN_RGB, STDDEV_RGB
    from hrnet.evaluate import THUMBNAIL, Mistakes

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 8, 8, 3)).astype(np.float32)
    images = (rgb / 255 - np.float32(MEAN_RGB)) / np.float32(STDDEV_RGB)  # as the input pipeline normalizes
    labels = np.array([0, 1, 2, 0, 1, 2])
    predicted = np.array([0, 2, 0, 1, 1, 0])  # wrong: positions 1, 2, 3, 5
    p_true = np.array([0.9, 0.05, 0.3, 0.01, 0.8, 0.3])  # position 5 ties position 2
    probabilities = np.zeros((6, 3))
    probabilities[np.arange(6), labels] = p_true
    probabilities[np.arange(6), predicted] = np.where(predicted == labels, p_true, 1 - p_true)
    mistakes = Mistakes(keep=3)
    mistakes.add(images[:4], labels[:4], predicted[:4], probabilities[:4])
    mistakes.add(images[4:], labels[4:], predicted[4:], probabilities[4:])  # positions go on across batches
    kept = mistakes.worst_first()
    assert [m["position"] for m in kept] == [3, 1, 2]  # 0.01, 0.05, then the earlier of the 0.3 tie
    assert kept[0]["true"] == 0 and kept[0]["predicted"] == 1 and kept[0]["probability"] == pytest.approx(0.99)
    assert kept[0]["true_probability"] == pytest.approx(0.01)
    assert np.array_equal(np.asarray(kept[0]["thumbnail"]), rgb[3].astype(np.uint8))  # the image, denormalized
    big = Mistakes(keep=1)
    big.add(np.zeros((1, 224, 224, 3), np.float32), np.array([0]), np.array([1]), np.array([[0.2, 0.8]]))
    assert big.worst_first()[0]["thumbnail"].size == (THUMBNAIL, THUMBNAIL)


@pytest.mark.parametrize("num_classes", [10, 1000])
def test_chromium_draws_the_report_with_no_console_errors(tmp_path, num_classes):
    """Headless Chromium (Debian's) opens the page as a person would: every figure drawn at a
    readable size, every thumbnail decoded, the tables there, nothing wider than the window,
    nothing in the console; and the screenshot is not blank."""
    from browser import render as in_chromium
    from PIL import Image

    checkpoint, evaluation = _with_validation(tmp_path, num_classes=num_classes)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    metrics["mistakes"] = [{"true": c, "true_name": f"n0{c}", "predicted": c + 1, "predicted_name": f"n0{c + 1}",
                            "probability": 0.9, "true_probability": 0.05, "image": f"mistake-{c + 1:02d}.png"}
                           for c in range(4)]
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    for c in range(4):
        Image.new("RGB", (96, 96), (60 * c, 100, 200)).save(tmp_path / "eval" / f"mistake-{c + 1:02d}.png")
    path = write_report(str(tmp_path / "report.html"), checkpoint=checkpoint, evaluation=evaluation)
    shown = in_chromium(path, str(tmp_path / "report.png"))
    assert shown["problems"] == []
    assert [f["id"] for f in shown["figures"]] == ["curves", "confusion", "classes"]
    assert all(300 <= f["width"] <= 1280 and f["height"] >= 150 for f in shown["figures"]), shown["figures"]
    assert shown["images"] == [96] * 4 and not shown["overflow"]
    assert shown["tables"]["settings"] >= 8 and shown["tables"]["confused"] >= 2
    assert shown["tables"]["per-class"] == 1 + min(num_classes, TABLE_ROWS // 2 if num_classes > TABLE_ROWS else
                                                   num_classes)
    assert "Most confident mistakes" in shown["text"] and "taken for n01" in shown["text"]
    screenshot = Image.open(tmp_path / "report.png")
    assert screenshot.width == 1280 and screenshot.height > 2000
    assert len(screenshot.convert("L").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50  # drawn, not blank
