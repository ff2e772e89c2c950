"""Container images and cluster object names the compiled pipeline refers to.

The ONE place these names are written: `images/` builds ``<registry>/hrnet-<target>:<tag>``
(``make images REGISTRY=... TAG=...``), `manifests/` creates the Secret and the
ServiceAccount, and the pipeline compiler reads them from here. This module imports
nothing outside the standard library, so tests and scripts can read it cheaply.

Compile-time overrides (no code edit needed to use a private registry):
``HRNET_IMAGE_REGISTRY``, ``HRNET_IMAGE_TAG``, or a full reference per target in
``HRNET_IMAGE_CPU`` / ``HRNET_IMAGE_GPU`` / ``HRNET_IMAGE_ASCEND``.
"""
import os
from typing import Optional

REGISTRY = "ghcr.io/hrnet-kfp"
TAG = "0.1.0"  # follows hrnet.__version__; images are tagged with the release they install
TARGETS = ("ascend", "gpu", "cpu")

# The image each target's steps run in; every step of one target uses the same image.
IMAGES = {target: f"{REGISTRY}/hrnet-{target}:{TAG}" for target in TARGETS}

# Object-store credentials reach the steps as environment variables from this Secret
# (created by manifests/base from its template), never as pipeline parameters.
OBJECT_STORE_SECRET = "hrnet-object-store"
# secret key -> environment variable (the names hrnet.storage reads)
OBJECT_STORE_ENV = {
    "endpoint": "S3_ENDPOINT",
    "accesskey": "AWS_ACCESS_KEY_ID",
    "secretkey": "AWS_SECRET_ACCESS_KEY",
}

# The data PVC (raw image trees, e.g. ImageNet) the convert step mounts at DATA_MOUNT,
# so source_uri may be a path under it as well as an s3:// / minio:// URI.
# The pod label manifests/minio/networkpolicy.yaml admits to the object store's API.
OBJECT_STORE_CLIENT_LABEL = ("hrnet.io/object-store-client", "true")
# The user every image runs as (images/*/Dockerfile HRNET_UID; the Ascend image's HwHiAiUser).
RUN_AS_USER = 1000
DATA_PVC = "hrnet-data"
DATA_MOUNT = "/data"

# The ServiceAccount runs are submitted with: it may get pods, so the train step can
# read the Ascend device plugin's pod annotation to build the HCCL rank table.
SERVICE_ACCOUNT = "hrnet-pipeline"


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError("unknown target {!r}; choose one of: {}".format(target, ", ".join(TARGETS)))
    return target


def image_for(target: str, registry: Optional[str] = None, tag: Optional[str] = None) -> str:
    """The image reference of ``target``; arguments, then environment, then defaults."""
    check_target(target)
    full = os.environ.get("HRNET_IMAGE_" + target.upper())
    if full and registry is None and tag is None:
        return full
    registry = registry or os.environ.get("HRNET_IMAGE_REGISTRY") or REGISTRY
    tag = tag or os.environ.get("HRNET_IMAGE_TAG") or TAG
    return "{}/hrnet-{}:{}".format(registry.rstrip("/"), target, tag)
