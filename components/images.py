"""Container images and cluster object names the compiled pipeline refers to.

The ONE place these names are written: `images/` builds ``<registry>/hrnet-<target>:<tag>``
(``make images REGISTRY=... TAG=...``), `manifests/` creates the Secret and the
ServiceAccount (their names are in hrnet.runtime.cluster, re-exported here), and the pipeline
compiler reads them from here. This module imports nothing but the standard library and that
module, so tests and scripts can read it cheaply.

Compile-time overrides (no code edit needed to use a private registry):
``HRNET_IMAGE_REGISTRY``, ``HRNET_IMAGE_TAG``, or a full reference per target in
``HRNET_IMAGE_CPU`` / ``HRNET_IMAGE_GPU`` / ``HRNET_IMAGE_ASCEND``.
"""
import os
from typing import Optional

from hrnet.runtime.cluster import (  # noqa: F401
    CACHE_DIR,
    CACHE_VOLUME,
    OBJECT_STORE_CLIENT_LABEL,
    OBJECT_STORE_ENV,
    OBJECT_STORE_SECRET,
    RUN_AS_USER,
    SERVICE_ACCOUNT,
    TRAIN_POD,
)

REGISTRY = "ghcr.io/hrnet-kfp"
TAG = "0.1.0"  # follows hrnet.__version__; images are tagged with the release they install
TARGETS = tuple(TRAIN_POD)  # ascend, gpu, cpu

# The image each target's steps run in; every step of one target uses the same image.
IMAGES = {target: f"{REGISTRY}/hrnet-{target}:{TAG}" for target in TARGETS}

# The data PVC (raw image trees, e.g. ImageNet) the prepare-data step mounts at DATA_MOUNT,
# so data_uri may be a path under it (an image tree) as well as an s3:// / minio:// URI.
DATA_PVC = "hrnet-data"
DATA_MOUNT = "/data"


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
