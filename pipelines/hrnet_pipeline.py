"""The HRNet pipeline: validate -> prepare-data (convert, or refer to TFRecords) -> train -> evaluate,
export -> deploy.

One YAML per target (ascend | gpu | cpu), chosen when compiling; everything else is a
run-time parameter. ``PYTHONPATH=. kfp dsl compile --py pipelines/hrnet_pipeline.py --output
x.yaml`` (in the checkout's root) compiles the target named by ``HRNET_TARGET`` (default ascend); ``python -m pipelines
compile --target ...`` does the same with flags.

Per target the train step gets (the rest of the steps are plain CPU pods):

- ascend: ``huawei.com/Ascend910`` = devices, node selector accelerator=huawei-Ascend910,
  a toleration for the chips' taint, a memory emptyDir at /dev/shm;
- gpu: ``nvidia.com/gpu`` = devices, a toleration, /dev/shm;
- cpu: cpu and memory requests only.

``hrnet launch`` starts one process per device; on Ascend it builds the HCCL rank table
from the device plugin's pod annotation (read with the run's ServiceAccount). With ``nodes`` > 1
the train step is a small launcher pod instead (components/train_job.py): it creates a Volcano
Job (ascend) or TFJob (gpu, cpu) of ``nodes`` pods shaped as above and follows it.
"""
import os
from typing import Optional

from kfp import dsl, kubernetes

from components import images
from components.data import prepare_data
from components.deploy import deploy
from components.evaluate import evaluate
from components.export import export
from components.record import record_run
from components.train import train
from components.train_job import train_job
from components.validate import validate
from hrnet.runtime import cluster
from pipelines import parameters

PIPELINE_NAME = "hrnet-classification"

# What each target asks of Kubernetes for one server's train pod (also each pod of a multi-node job).
TARGETS = images.TRAIN_POD
# How long the deploy step waits for the InferenceService to be Ready (model download and load included).
DEPLOY_TIMEOUT = 900.0
# (request, limit) of the CPU-only steps: prepare-data decodes and re-encodes JPEGs in parallel
# (when it converts), evaluate runs the model over the validation split, the others are light.
STEP_RESOURCES = {
    "validate": (("100m", "1"), ("256M", "1G")),
    "data": (("4", "16"), ("8G", "32G")),
    "evaluate": (("4", "16"), ("8G", "32G")),
    # Launches and follows a multi-node job, then copies its checkpoint into the Model artifact.
    "train-job": (("500m", "2"), ("512M", "2G")),
    "export": (("2", "8"), ("8G", "16G")),
    # Creates or updates the InferenceService and polls it.
    "deploy": (("100m", "1"), ("256M", "1G")),
    "record-run": (("100m", "1"), ("256M", "1G")),
}


def _pod_policy(task):
    """Every step runs as the images' user, never as root (KFP's compiler and backend add
    allowPrivilegeEscalation=false, all capabilities dropped and the RuntimeDefault seccomp
    profile themselves; a read-only root file system KFP cannot express: docs/cluster.md), and may
    reach the object store (its launcher uploads the step's artifacts there):
    the NetworkPolicy of manifests/seaweedfs (or minio) admits pods with this label."""
    kubernetes.set_security_context(task, run_as_user=images.RUN_AS_USER, run_as_non_root=True)
    kubernetes.add_pod_label(task, *images.OBJECT_STORE_CLIENT_LABEL)
    return task


def _configure(task, step: str, image: str, secret: bool = True):
    (cpu_req, cpu_lim), (mem_req, mem_lim) = STEP_RESOURCES[step]
    _pod_policy(task)
    task.set_container_image(image)
    task.set_cpu_request(cpu_req).set_cpu_limit(cpu_lim).set_memory_request(mem_req).set_memory_limit(mem_lim)
    if secret:
        kubernetes.use_secret_as_env(task, images.OBJECT_STORE_SECRET, images.OBJECT_STORE_ENV)
    return task


def _configure_train(task, target: str, image: str, devices, retries: int, sized_for: int):
    spec = TARGETS[target]
    _pod_policy(task)
    task.set_container_image(image)
    sized = cluster.train_resources(target, sized_for)
    task.set_cpu_request(sized["cpu"][0]).set_cpu_limit(sized["cpu"][1])
    task.set_memory_request(sized["memory"][0]).set_memory_limit(sized["memory"][1])
    if spec["accelerator"]:
        task.set_accelerator_type(spec["accelerator"]).set_accelerator_limit(devices)
        # Accelerator nodes are commonly tainted with their resource name to keep other pods off.
        kubernetes.add_toleration(task, key=spec["accelerator"], operator="Exists", effect="NoSchedule")
    for key, value in spec["node_selector"].items():
        kubernetes.add_node_selector(task, key, value)
    if spec["shm"]:
        # The container runtime's 64 MB /dev/shm is too small for the collective libraries
        # (HCCL, NCCL) and the input pipeline's shared buffers.
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=spec["shm"])
    # Streamed shards (at most data_cache_gb) and the run's working copy. KFP cannot set a
    # container's ephemeral-storage request; a size-limited emptyDir is the bound it can set
    # (the multi-node job's pods request it too: hrnet.runtime.job_objects).
    kubernetes.empty_dir_mount(task, volume_name="cache", mount_path=images.CACHE_DIR, size_limit=images.CACHE_VOLUME)
    task.set_env_variable("HRNET_CACHE_DIR", images.CACHE_DIR)
    kubernetes.use_secret_as_env(task, images.OBJECT_STORE_SECRET, images.OBJECT_STORE_ENV)
    # Node loss, a preempted pod or an HCCL connect timeout deserve another try, which resumes
    # from the last checkpoint mirrored (to checkpoint_uri, or beside the step's artifact). It
    # waits out the lease the killed pod left on that location (storage.LEASE_TTL).
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="150s", backoff_factor=2.0)
    return task


def build_pipeline(target: str = "ascend", image: Optional[str] = None, data_pvc: Optional[str] = images.DATA_PVC,
                   train_retries: int = 2, train_devices: int = cluster.MAX_DEVICES):
    """The pipeline function for ``target``; ``image`` overrides components.images.image_for(target),
    ``data_pvc`` (None: none) is mounted at /data in the prepare-data step, ``train_retries``: how
    often a failed train step is tried again (0: never), ``train_devices``: the devices the
    single train pod's CPU and memory are sized for (a run may use fewer, not more: its
    validate step refuses more)."""
    images.check_target(target)
    image = image or images.image_for(target)
    device = TARGETS[target]["device"]
    # hrnet serve runs on KServe's Python server, which the Ascend image (Python 3.9) cannot hold.
    serving_image = images.image_for("cpu") if target == "ascend" else image

    def evaluate_export(dataset, model, run):
        """Evaluate, export and (when asked) deploy ``model``: written once, placed in each train
        branch, since KFP's local runner cannot merge two branches' artifacts (dsl.OneOf) and a
        sub-pipeline would nest the run graph one level deeper."""
        evaluate_task = evaluate(dataset=dataset, model=model)
        _configure(evaluate_task, "evaluate", image)
        export_task = export(model=model, onnx=run["export_onnx"])
        _configure(export_task, "export", image)
        # Only weights that were evaluated are served.
        deploy_task = deploy(exported=export_task.outputs["exported"], enabled=run["deploy"], name=run["deploy_name"],
                             runtime=run["serving_runtime"], image=serving_image, timeout=DEPLOY_TIMEOUT
                             ).after(evaluate_task)
        _configure(deploy_task, "deploy", image, secret=False)
        for task in (evaluate_task, export_task, deploy_task):  # not evaluate-2 ... in the other branch
            task.set_display_name(task.component_spec.name.replace("_", "-"))

    def hrnet_pipeline(*args):
        run = parameters.bind(args)
        record_task = record_run()
        _configure(record_task, "record-run", image, secret=False)
        record_task.set_caching_options(False)
        # The run graph is at most three levels deep: the exit handler, the train branches, a branch.
        with dsl.ExitHandler(record_task, name="hrnet-run"):
            check = validate(**parameters.validate_arguments(run, device, train_devices))
            _configure(check, "validate", image, secret=False)
            check.set_caching_options(False)
            # Datasets pass by reference (hrnet.data.reference): KFP's launcher would download a
            # whole Dataset artifact into every pod that takes it.
            data = prepare_data(data_uri=run["data_uri"], datasets_uri=run["datasets_uri"]).after(check)
            _configure(data, "data", image)
            # KFP's cache key is the data URI, not what is there: a changed tree under the
            # same URI must be converted again. Converting unchanged input is a quick no-op
            # when datasets_uri holds it already (the converter's own fingerprint).
            data.set_caching_options(False)
            if data_pvc:
                kubernetes.mount_pvc(data, pvc_name=data_pvc, mount_path=images.DATA_MOUNT)
            dataset, config = data.outputs["dataset"], check.outputs["config"]
            with dsl.If(run["nodes"] == 1, name="one-server"):
                train_task = train(dataset=dataset, config=config, devices=run["devices"],
                                   checkpoint_uri=run["checkpoint_uri"])
                _configure_train(train_task, target, image, run["devices"], train_retries, train_devices)
                evaluate_export(dataset, train_task.outputs["model"], run)
            with dsl.Else(name="several-servers"):
                # This pod only launches and follows the job: no accelerator, small requests. Named
                # after the run, a retry of it re-attaches to the job it created.
                job_task = train_job(dataset=dataset, config=config, nodes=run["nodes"], devices=run["devices"],
                                     checkpoint_uri=run["checkpoint_uri"], target=target, image=image,
                                     job_name=dsl.PIPELINE_JOB_ID_PLACEHOLDER, timeout=run["job_timeout"])
                _configure(job_task, "train-job", image)
                if train_retries:
                    job_task.set_retry(num_retries=train_retries, backoff_duration="150s", backoff_factor=2.0)
                job_task.set_display_name("train")
                evaluate_export(dataset, job_task.outputs["model"], run)

    # KFP reads the parameters from the signature and their run-form descriptions from the
    # Args: section of the docstring, both made from pipelines/parameters.py.
    hrnet_pipeline.__signature__ = parameters.signature(device)
    hrnet_pipeline.__doc__ = parameters.docstring(
        "Converts an image tree (or takes TFRecords converted before), trains, evaluates the best weights by "
        "validation top-1 and exports them.", device)
    return dsl.pipeline(name=PIPELINE_NAME,
                        description=f"HRNet image classification ({target}): convert -> train -> evaluate -> export",
                        )(hrnet_pipeline)


# The module-level pipeline `kfp dsl compile --py pipelines/hrnet_pipeline.py` finds.
hrnet_pipeline = build_pipeline(os.environ.get("HRNET_TARGET", "ascend"))
