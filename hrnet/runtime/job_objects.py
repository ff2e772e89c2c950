"""The Kubernetes objects of a multi-node training job (hrnet.runtime.jobs runs them): the
job of each engine (a Volcano Job for Ascend, a TFJob for GPUs and CPUs), its pods in the
shape of the single-pod train step's, and the rank table's ConfigMap. Plain dicts: the
kubernetes package is not needed to build them.
"""
import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from hrnet.errors import HrnetError
from hrnet.runtime import check_devices, check_nodes, cluster

JOB_LABEL = "hrnet.io/job"
RING_LABEL = ("ring-controller.atlas", "ascend-910")
RING_VOLUME = "ascend-910-config"
RING_MOUNT = "/user/serverid/devindex/config"
RANK_TABLE_TIMEOUT = 600


class Engine:
    """A job engine: the custom resource a multi-node job is, and what is particular to it."""
    group: str
    version: str
    plural: str
    kind: str
    # The container name the engine expects.
    container: str

    def labels(self, spec: "JobSpec") -> Dict[str, str]:
        """Labels of its own on the job and its pods."""
        return {}

    def launch_flags(self) -> List[str]:
        """``hrnet launch`` flags of its own."""
        return []

    def adapt_pod(self, pod: Dict[str, Any], spec: "JobSpec") -> None:
        """What its pods need besides the common shape."""

    def job_spec(self, spec: "JobSpec", template: Dict[str, Any]) -> Dict[str, Any]:
        """The custom resource's ``spec`` for ``spec``'s job with pods of ``template``."""
        raise NotImplementedError

    def phase(self, status: Mapping[str, Any]) -> Tuple[str, str]:
        """("running" | "succeeded" | "failed", the engine's words) of a job's status."""
        raise NotImplementedError

    def companions(self, spec: "JobSpec", job: Mapping[str, Any]) -> List[Dict[str, Any]]:
        """Objects to create beside the job, owned by it."""
        return []


class Volcano(Engine):
    """A Volcano Job, for Ascend: gang-scheduled pods, and the ConfigMap in which Ascend's
    hccl-controller writes the rank table."""
    group, version, plural, kind, container = "batch.volcano.sh", "v1alpha1", "jobs", "Job", "train"

    def labels(self, spec: "JobSpec") -> Dict[str, str]:
        # hccl-controller finds a Volcano Job's ConfigMap through this label and the volume's name.
        return {RING_LABEL[0]: RING_LABEL[1]}

    def launch_flags(self) -> List[str]:
        # hccl-controller writes the rank table once every pod runs, and the other servers may still
        # be pulling the image: wait longer than the launcher's default (as manifests/volcano does).
        return ["--rank-table-timeout", str(RANK_TABLE_TIMEOUT)]

    def adapt_pod(self, pod: Dict[str, Any], spec: "JobSpec") -> None:
        container = pod["containers"][0]
        container["env"] += [
            {"name": "RANK_TABLE_FILE", "value": f"{RING_MOUNT}/hccl.json"},
            # This server's entry in the rank table (hccl-controller's server_id is the node IP).
            {"name": "XDL_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
            # The chips Volcano's Ascend plugin gave this pod.
            {"name": "ASCEND_VISIBLE_DEVICES",
             "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['huawei.com/Ascend910']"}}},
        ]
        container["volumeMounts"].append({"name": RING_VOLUME, "mountPath": RING_MOUNT, "readOnly": True})
        pod["volumes"].append({"name": RING_VOLUME, "configMap": {"name": spec.ring_config}})
        # One pod per server: each takes all the chips it asked for on one.
        pod["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {JOB_LABEL: spec.name}}, "topologyKey": "kubernetes.io/hostname"}]}}

    def job_spec(self, spec: "JobSpec", template: Dict[str, Any]) -> Dict[str, Any]:
        return {
            "schedulerName": "volcano",
            "queue": spec.queue,
            "minAvailable": spec.nodes,  # gang scheduling: all pods or none
            "maxRetry": spec.max_retry,
            "ttlSecondsAfterFinished": spec.ttl_after_finished,
            # One lost pod breaks the HCCL ring: restart all of them (training resumes from --out).
            "policies": [{"event": "PodEvicted", "action": "RestartJob"},
                         {"event": "PodFailed", "action": "RestartJob"}],
            "tasks": [{"name": "worker", "replicas": spec.nodes,
                       "policies": [{"event": "TaskCompleted", "action": "CompleteJob"}],
                       "template": template}],
        }

    def phase(self, status: Mapping[str, Any]) -> Tuple[str, str]:
        state = status.get("state") or {}
        phase = state.get("phase") or "Pending"
        words = phase + (f" ({state['message']})" if state.get("message") else "")
        if phase == "Completed":
            return "succeeded", words
        if phase in ("Failed", "Aborted", "Terminated"):
            return "failed", words
        return "running", words

    def companions(self, spec: "JobSpec", job: Mapping[str, Any]) -> List[Dict[str, Any]]:
        return [ring_config_object(spec, owner=job)]


class TFJob(Engine):
    """A training operator TFJob, for GPUs and CPUs: the operator injects TF_CONFIG and the
    port into the container named "tensorflow"."""
    group, version, plural, kind, container = "kubeflow.org", "v1", "tfjobs", "TFJob", "tensorflow"

    def job_spec(self, spec: "JobSpec", template: Dict[str, Any]) -> Dict[str, Any]:
        return {
            # Pods still running when the job ends go; finished ones stay for their logs.
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": spec.max_retry,
                          "ttlSecondsAfterFinished": spec.ttl_after_finished},
            "tfReplicaSpecs": {"Worker": {"replicas": spec.nodes, "restartPolicy": "Never", "template": template}},
        }

    def phase(self, status: Mapping[str, Any]) -> Tuple[str, str]:
        true = [c for c in status.get("conditions") or [] if c.get("status") == "True"]
        last = true[-1] if true else {"type": "Created"}
        words = last.get("type", "?") + (f" ({last['message']})" if last.get("message") else "")
        if last.get("type") == "Succeeded":
            return "succeeded", words
        if last.get("type") == "Failed":
            return "failed", words
        return "running", words


VOLCANO = Volcano()
TFJOB = TFJob()
ENGINES = {"ascend": VOLCANO, "gpu": TFJOB, "cpu": TFJOB}

_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 45  # pods are <name>-worker-<i>, and a pod name is a 63-character DNS label


def job_name(run_id: str, prefix: str = "hrnet-train") -> str:
    """A job name made from a run's id (a KFP run's UUID): lower-case DNS label, at most MAX_NAME."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(run_id).lower()).strip("-")
    if not slug:
        raise HrnetError(f"cannot make a job name from the run id {run_id!r}")
    return f"{prefix}-{slug}"[:MAX_NAME].rstrip("-")


@dataclass
class JobSpec:
    """One multi-node training job: ``nodes`` pods of ``devices`` devices, each running ``command``
    under ``hrnet launch``; pods shaped as the single-pod train step's (cluster.TRAIN_POD)."""
    name: str
    target: str
    nodes: int
    devices: int
    image: str
    command: List[str]
    namespace: str = "hrnet"
    service_account: str = cluster.SERVICE_ACCOUNT
    secret: str = cluster.OBJECT_STORE_SECRET
    queue: str = "default"
    max_retry: int = 3
    ttl_after_finished: int = 86400
    labels: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target not in ENGINES:
            raise HrnetError(f"--target must be one of {', '.join(ENGINES)}, got {self.target!r}")
        check_nodes(self.nodes)
        check_devices(self.devices, "devices (per node)")
        if isinstance(self.max_retry, bool) or not isinstance(self.max_retry, int):
            raise HrnetError(f"max_retry must be a whole number, got {self.max_retry!r}")
        if self.max_retry < 0:
            raise HrnetError(f"max_retry must be 0 or more, got {self.max_retry}")
        if not _NAME.match(self.name) or len(self.name) > MAX_NAME:
            raise HrnetError(f"job name {self.name!r} must be a lower-case DNS label (a-z, 0-9, -) of at most "
                             f"{MAX_NAME} characters")
        if not self.image:
            raise HrnetError("the job needs an image (--image)")
        command = list(self.command)
        if command and command[0] == "--":
            command = command[1:]
        if not command:
            raise HrnetError("no command to run in the job; put it after --, e.g. -- hrnet train --data s3://...")
        self.command = command

    @property
    def engine(self) -> Engine:
        return ENGINES[self.target]

    @property
    def device(self) -> str:
        return cluster.TRAIN_POD[self.target]["device"]

    @property
    def chief(self) -> str:
        return f"{self.name}-worker-0"  # Volcano: <job>-<task>-<index>; TFJob: <job>-<replica type>-<index>

    @property
    def ring_config(self) -> str:
        return f"rings-config-{self.name}"


def _labels(spec: JobSpec) -> Dict[str, str]:
    return {"app.kubernetes.io/name": "hrnet", "app.kubernetes.io/component": "train",
            "app.kubernetes.io/part-of": "hrnet", **spec.labels, JOB_LABEL: spec.name, **spec.engine.labels(spec)}


def pod_template(spec: JobSpec) -> Dict[str, Any]:
    """The pod of one server, in the shape of the single-pod train step's."""
    shape = cluster.TRAIN_POD[spec.target]
    sized = cluster.train_resources(spec.target, spec.devices)  # the run's devices, known here
    requests = {name: request for name, (request, _) in sized.items()}
    limits = {name: limit for name, (_, limit) in sized.items()}
    if shape["accelerator"]:
        requests[shape["accelerator"]] = limits[shape["accelerator"]] = spec.devices
    # The cache holds streamed shards (at most data_cache_gb) and the run's working copy.
    requests["ephemeral-storage"] = limits["ephemeral-storage"] = cluster.CACHE_VOLUME
    env: List[Dict[str, Any]] = [{"name": "HRNET_CACHE_DIR", "value": cluster.CACHE_DIR}]
    env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": spec.secret, "key": key}}}
            for key, var in cluster.OBJECT_STORE_ENV.items()]
    mounts = [{"name": "cache", "mountPath": cluster.CACHE_DIR}]
    volumes: List[Dict[str, Any]] = [{"name": "cache", "emptyDir": {"sizeLimit": cluster.CACHE_VOLUME}}]
    if shape["shm"]:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shape["shm"]}})
    pod: Dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": spec.service_account,
        # The training processes need no API access (the rank table comes from a mounted ConfigMap).
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": cluster.RUN_AS_USER,
                            "runAsGroup": cluster.RUN_AS_USER, "fsGroup": cluster.RUN_AS_USER,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": spec.engine.container,
            "image": spec.image,
            "args": ["hrnet", "launch", "--nproc", str(spec.devices), "--device", spec.device,
                     *spec.engine.launch_flags(), "--",
                     *spec.command],
            "env": env,
            "resources": {"requests": requests, "limits": limits},
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    }
    if shape["node_selector"]:
        pod["nodeSelector"] = dict(shape["node_selector"])
    if shape["accelerator"]:
        pod["tolerations"] = [{"key": shape["accelerator"], "operator": "Exists", "effect": "NoSchedule"}]
    spec.engine.adapt_pod(pod, spec)
    labels = dict(_labels(spec))
    labels[cluster.OBJECT_STORE_CLIENT_LABEL[0]] = cluster.OBJECT_STORE_CLIENT_LABEL[1]
    return {"metadata": {"labels": labels}, "spec": pod}


def job_object(spec: JobSpec) -> Dict[str, Any]:
    """The Volcano Job or TFJob of ``spec``."""
    metadata = {"name": spec.name, "namespace": spec.namespace, "labels": _labels(spec)}
    engine = spec.engine
    return {"apiVersion": f"{engine.group}/{engine.version}", "kind": engine.kind, "metadata": metadata,
            "spec": engine.job_spec(spec, pod_template(spec))}


def ring_config_object(spec: JobSpec, owner: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The ConfigMap hccl-controller fills with the Volcano Job's rank table, owned by the job."""
    metadata: Dict[str, Any] = {"name": spec.ring_config, "namespace": spec.namespace, "labels": _labels(spec)}
    if owner:
        metadata["ownerReferences"] = [{"apiVersion": owner["apiVersion"], "kind": owner["kind"],
                                        "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
                                        "blockOwnerDeletion": False}]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata,
            "data": {"hccl.json": json.dumps({"status": "initializing"})}}


def job_phase(engine: Engine, job: Mapping[str, Any]) -> Tuple[str, str]:
    """("running" | "succeeded" | "failed", the engine's words) of a job object."""
    return engine.phase(job.get("status") or {})
