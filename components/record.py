"""The exit handler: records how the run ended, also (above all) when a step failed."""
from kfp import dsl
from kfp.dsl import Artifact, Output

from components.images import IMAGES


@dsl.component(base_image=IMAGES["cpu"], install_kfp_package=False)
def record_run(status: dsl.PipelineTaskFinalStatus, run_record: Output[Artifact]):
    """A manifest (kind "run-status": state, error, job) in ``run_record``, also on failure."""
    import os

    from hrnet.manifest import write_manifest

    record = {"kind": "run-status", "state": status.state, "job": status.pipeline_job_resource_name,
              "task": status.pipeline_task_name, "error_code": status.error_code,
              "error_message": status.error_message}
    outcome = status.state if status.state == "SUCCEEDED" else f"{status.state} ({status.error_message})"
    print(f"run {status.pipeline_job_resource_name}: {outcome}")
    os.makedirs(run_record.path, exist_ok=True)
    write_manifest(run_record.path, record)
