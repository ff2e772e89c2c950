"""The exit handler: records how the run ended, also (above all) when a step failed."""
from kfp import dsl
from kfp.dsl import Artifact, Output

from components.images import IMAGES


@dsl.component(base_image=IMAGES["cpu"], install_kfp_package=False)
def record_run(status: dsl.PipelineTaskFinalStatus, run_record: Output[Artifact]):
    """A manifest (kind "run-status": state, error, job) in ``run_record``, also on failure."""
    from hrnet.manifest import write_manifest

    record = {"kind": "run-status", "state": status.state, "job": status.pipeline_job_resource_name,
              "task": status.pipeline_task_name, "error_code": status.error_code,
              "error_message": status.error_message}
    print("run {}: {}{}".format(record["job"], record["state"],
                            "" if record["state"] == "SUCCEEDED" else " ({})".format(record["error_message"])))
    write_manifest(run_record.path, record)
