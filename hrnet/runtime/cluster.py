"""The cluster's names and the train pod's shape, written once for the pipeline and the job launcher.

`manifests/` creates the Secret and the ServiceAccount named here; the compiled pipeline's
single train pod (pipelines/hrnet_pipeline.py) and each pod of a multi-node job
(hrnet.runtime.jobs) are shaped alike per server, from TRAIN_POD. Standard library
only: components/images.py re-exports these names, and tests read them cheaply.
"""
from typing import Any, Dict, Tuple

# Object-store credentials reach the pods as environment variables from this Secret,
# never as parameters: secret key -> environment variable (the names hrnet.storage reads).
OBJECT_STORE_SECRET = "hrnet-object-store"
OBJECT_STORE_ENV = {
    "endpoint": "S3_ENDPOINT",
    "accesskey": "AWS_ACCESS_KEY_ID",
    "secretkey": "AWS_SECRET_ACCESS_KEY",
}
# The pod label the NetworkPolicy of manifests/seaweedfs (or minio) admits to the object store's API.
OBJECT_STORE_CLIENT_LABEL = ("hrnet.io/object-store-client", "true")
# The user every image runs as (images/*/Dockerfile HRNET_UID; the Ascend image's HwHiAiUser).
RUN_AS_USER = 1000
# The ServiceAccount runs are submitted with (manifests/base/rbac.yaml says what it may do).
SERVICE_ACCOUNT = "hrnet-pipeline"

# Local disk a server gives training data streamed from object storage by default
# (TrainConfig.data_cache_gb, hrnet.data.stream); ImageNet's 1,024 train shards are ~140 MB.
DATA_CACHE_GB = 20
# The train pod's cache volume (HRNET_CACHE_DIR): the streamed shards, and beside them the
# run folder's working copy (checkpoints, TensorBoard events) and the staged manifests.
CACHE_DIR = "/cache"
CACHE_VOLUME = f"{DATA_CACHE_GB + 10}G"

# What one server's train pod asks of Kubernetes, per target: `hrnet train --device`, the
# extended resource taken `devices` times, node selector, (request, limit) of CPU cores and of
# GiB of memory per device (an accelerator, or a process on the cpu target: train_resources
# multiplies them), and a memory-backed /dev/shm (the container runtime's 64 MB is too small
# for HCCL / NCCL and the input pipeline's shared buffers).
TRAIN_POD: Dict[str, Dict[str, Any]] = {
    # An Atlas 800 training server: 8 chips, 192 cores, 768 GB or more.
    "ascend": dict(device="npu", accelerator="huawei.com/Ascend910",
                   node_selector={"accelerator": "huawei-Ascend910"},
                   cpu_per_device=(2, 12), memory_per_device=(8, 48), shm="32Gi"),
    "gpu": dict(device="gpu", accelerator="nvidia.com/gpu", node_selector={},
                cpu_per_device=(1, 8), memory_per_device=(4, 32), shm="16Gi"),
    "cpu": dict(device="cpu", accelerator=None, node_selector={},
                cpu_per_device=(1, 4), memory_per_device=(2, 8), shm=None),
}
# The devices a compiled pipeline's single train pod is sized for, unless compiled for fewer
# (`python -m pipelines compile --train-devices N`): KFP fixes a step's CPU and memory when it
# compiles, while `devices` is chosen per run. A multi-node job's pods are sized per run.
MAX_DEVICES = 8


def train_resources(target: str, devices: int) -> Dict[str, Tuple[str, str]]:
    """(request, limit) of "cpu" and "memory" for a train pod of ``devices`` devices."""
    shape = TRAIN_POD[target]
    (cpu_request, cpu_limit), (memory_request, memory_limit) = shape["cpu_per_device"], shape["memory_per_device"]
    return {"cpu": (str(cpu_request * devices), str(cpu_limit * devices)),
            "memory": (f"{memory_request * devices}G", f"{memory_limit * devices}G")}
