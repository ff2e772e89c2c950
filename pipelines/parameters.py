"""The pipeline's run-time parameters, declared once.

The pipeline's signature, its run form's descriptions (KFP reads them from an ``Args:``
docstring) and ``python -m pipelines run-local``'s flags are all made from PARAMETERS. The
training ones come from hrnet.train.pipeline_args (TrainConfig's fields, PIPELINE_FIELDS); the
rest of TrainConfig reaches the run through ``train_config``. Kept free of kfp, so that the
CLI starts without it.
"""
import inspect
from typing import Any, Dict, List

from hrnet.train.pipeline_args import PIPELINE_FIELDS, Parameter, pipeline_parameters

# The default of a parameter a run must give: KFP marks it required in the run form.
REQUIRED = inspect.Parameter.empty


def parameters_for(device: str) -> List[Parameter]:
    """The parameters of a pipeline whose train step runs on ``device`` (its defaults differ:
    the precision)."""
    return [
        Parameter("data_uri", str, REQUIRED, "The data, required: an image tree to convert (ImageNet layout or "
                                             "class folders) or TFRecords converted before (by `hrnet convert` or "
                                             "slim), as an s3:// / minio:// URI or a path under /data. The "
                                             "prepare-data step tells which from what is there."),
        Parameter("devices", int, 1, "Accelerators (or CPU processes) in the train pod: 1, 2, 4 or 8; per server "
                                     "when nodes > 1."),
        Parameter("nodes", int, 1, "Servers to train on. 1: one train pod. More: the train step launches a Volcano "
                                   "Job (ascend) or TFJob (gpu, cpu) of `nodes` pods and follows it; its checkpoint "
                                   "goes through object storage."),
        *pipeline_parameters(device),
        Parameter("train_config", dict, {}, "More training settings, as TrainConfig keys and values (`hrnet train "
                                            "--help` lists them as flags), e.g. {\"schedule\": \"cosine\", "
                                            "\"warmup_epochs\": 1, \"flip\": false}; checked by the validate step. "
                                            "The parameters above set %s themselves." % ", ".join(PIPELINE_FIELDS)),
        Parameter("checkpoint_uri", str, "", "An s3:// / minio:// prefix where training mirrors its checkpoints as "
                                             "it goes; a retried train step, or a new run given the same URI, resumes "
                                             "from there. \"\" mirrors them beside the train step's artifact, which "
                                             "a retry finds too."),
        Parameter("job_timeout", float, 0.0, "Seconds a multi-node training job (nodes > 1) may run before it is "
                                             "deleted and the step fails; 0: no limit."),
        Parameter("export_onnx", bool, True, "Also export model.onnx, besides the SavedModel and the frozen graph."),
        Parameter("deploy", bool, False, "Serve the export on KServe once evaluated: create or update the "
                                         "InferenceService `deploy_name` in the run's namespace and wait until it is "
                                         "Ready; its URL is the deploy step's output. Needs KServe and "
                                         "manifests/kserve."),
        Parameter("deploy_name", str, "hrnet", "The InferenceService's name (a DNS label); a rerun updates it."),
        Parameter("serving_runtime", str, "tensorflow", "tensorflow: KServe's TensorFlow Serving loads the "
                                                        "SavedModel; hrnet: the project's cpu or gpu image runs "
                                                        "`hrnet serve` (class names in the answers)."),
        Parameter("datasets_uri", str, "", "Where converted records go; \"\" puts them beside the prepare-data step's "
                                           "artifacts. The steps pass only a reference, and each fetches just the "
                                           "shards it reads."),
    ]


# The cpu pipeline's: run-local's flags, and the names and types every target shares.
PARAMETERS = parameters_for("cpu")
NAMES = [p.name for p in PARAMETERS]


def signature(device: str) -> inspect.Signature:
    """The pipeline function's signature (KFP reads names, types and defaults from it)."""
    return inspect.Signature([inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=p.default,
                                                annotation=p.type) for p in parameters_for(device)])


def docstring(summary: str, device: str) -> str:
    """``summary`` and an ``Args:`` section, KFP's source of the run form's descriptions."""
    # One line each: KFP keeps a docstring's line breaks in the description.
    args = [f"    {p.name}: {p.description}" for p in parameters_for(device)]
    return "\n".join([summary, "", "Args:", *args]) + "\n"


def bind(args) -> Dict[str, Any]:
    """The pipeline function's positional arguments by name (KFP calls it positionally)."""
    return dict(zip(NAMES, args))


def validate_arguments(run: Dict[str, Any], device: str, train_devices: int) -> Dict[str, Any]:
    """The validate step's arguments (hrnet.train.pipeline_args.check_pipeline_parameters's)
    from a run's parameters: the pipeline passes them to the step, run-local checks them
    before it starts the pipeline."""
    names = ("data_uri", "devices", "nodes", "train_config", "deploy_name", "serving_runtime")
    return dict({name: run[name] for name in names + tuple(PIPELINE_FIELDS)}, device=device,
                train_devices=train_devices)
