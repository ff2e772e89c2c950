"""Evaluate a checkpoint on the validation split: KFP Metrics and an HTML report."""
from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components.images import IMAGES


@dsl.component(base_image=IMAGES["cpu"], install_kfp_package=False)
def evaluate(
    dataset: Input[Dataset],
    model: Input[Model],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    evaluation: Output[Artifact],
    report: Output[HTML],
    summary: Output[Markdown],
):
    """The training run's best weights (its last when it did not validate): top-1 / top-5 in
    the run's metrics; the confusion matrix in ``confusion`` up to
    hrnet.report.UI_CONFUSION_LIMIT classes; metrics.json (full matrix) in ``evaluation``;
    the curves, most-confused pairs and per-class table in ``report`` and, in Markdown,
    ``summary``."""
    from hrnet.evaluate import evaluate as evaluate_checkpoint
    from hrnet.report import ui_confusion_matrix, write_report

    result = evaluate_checkpoint(dataset.path, model.path, out=evaluation.path)
    for name in ("top1", "top5", "count", "step"):
        if result[name] is not None:  # imported weights have no step
            metrics.log_metric(name, result[name])
    matrix = ui_confusion_matrix(result)
    if matrix:
        confusion.log_confusion_matrix(*matrix)
    else:
        confusion.metadata["note"] = "too many classes to draw: see summary and metrics.json"
    write_report(report.path, checkpoint=model.path, evaluation=evaluation.path)
    write_report(summary.path, checkpoint=model.path, evaluation=evaluation.path, markdown=True)
