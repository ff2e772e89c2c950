"""Evaluate a checkpoint on the validation split: KFP Metrics and an HTML report."""
from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.images import IMAGES


@dsl.component(base_image=IMAGES["cpu"], install_kfp_package=False)
def evaluate(
    dataset: Input[Dataset],
    model: Input[Model],
    metrics: Output[Metrics],
    evaluation: Output[Artifact],
    report: Output[HTML],
):
    """Top-1 / top-5 in the run's metrics; metrics.json in ``evaluation``; the training
    curve and a per-class table in ``report``."""
    from hrnet.evaluate import evaluate as evaluate_checkpoint
    from hrnet.report import write_report

    result = evaluate_checkpoint(dataset.path, model.path, out=evaluation.path)
    for name in ("top1", "top5", "count"):
        metrics.log_metric(name, result[name])
    write_report(report.path, checkpoint=model.path, evaluation=evaluation.path)
