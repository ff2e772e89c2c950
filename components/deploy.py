"""Serve the export on KServe: an InferenceService created or updated, until it is Ready."""
from kfp import dsl
from kfp.dsl import Input, Model

from components.images import IMAGES


@dsl.component(base_image=IMAGES["cpu"], install_kfp_package=False)
def deploy(exported: Input[Model], enabled: bool, name: str, runtime: str, image: str, timeout: float) -> str:
    """hrnet.serving.deploy: the InferenceService ``name`` in this pod's namespace serves
    ``exported`` (its URI is the storageUri) with ``runtime`` (tensorflow: KServe's TensorFlow
    Serving; hrnet: ``image`` running hrnet serve). Returns the service's URL once Ready; fails
    with KServe's reason when the model cannot load, or after ``timeout`` seconds. Not
    ``enabled`` (the run's ``deploy`` parameter): says so and returns "", touching nothing; a
    step rather than a condition around it, which would nest the run graph one level deeper."""
    if not enabled:
        print("deploy=false: the export is not served (run with deploy=true to serve it on KServe)")
        return ""
    from hrnet.runtime.ranktable import pod_namespace
    from hrnet.serving.deploy import deploy as deploy_service
    from hrnet.serving.deploy import inference_service

    return deploy_service(inference_service(name, pod_namespace(), exported.uri, runtime, image), timeout=timeout)
