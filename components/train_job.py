"""Train on several servers: this step launches a Volcano Job (ascend) or TFJob (gpu, cpu) and follows it."""
from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import IMAGES


@dsl.component(base_image=IMAGES["cpu"], install_kfp_package=False)
def train_job(
    dataset: Input[Dataset],
    model: Output[Model],
    config: dict,
    nodes: int,
    devices: int,
    checkpoint_uri: str,
    target: str,
    image: str,
    job_name: str,
    timeout: float,
):
    """The train step for ``nodes`` > 1: hrnet.runtime.jobs.run_job creates (or, retried,
    re-attaches to) the job named after ``job_name`` (the run's id), streams its chief's log,
    deletes it on failure or cancellation, and the checkpoint it wrote to object storage
    becomes ``model``. Needs no accelerator itself; the job's pods take ``devices`` each."""
    from hrnet import storage
    from hrnet.data.reference import resolve
    from hrnet.runtime import job_objects, jobs
    from hrnet.runtime.ranktable import pod_namespace
    from hrnet.train.pipeline_args import train_command

    data = jobs.check_remote(resolve(dataset.path), "the data set")
    out = jobs.check_remote(checkpoint_uri or storage.sibling(model.uri, "checkpoints"), "the checkpoint location")
    spec = job_objects.JobSpec(name=job_objects.job_name(job_name), target=target, nodes=nodes, devices=devices,
                               image=image, command=train_command(data, out, config), namespace=pod_namespace())
    jobs.run_job(spec, timeout=timeout)
    storage.restore(out, model.path)  # the Model artifact holds the finished checkpoint
