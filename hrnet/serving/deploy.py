"""``hrnet deploy``: an export served by KServe, as an InferenceService created or updated and
followed until it is Ready.

    hrnet deploy --model s3://hrnet/runs/demo/export [--name hrnet] [--namespace hrnet]
        [--runtime tensorflow | --runtime hrnet --image REPO/hrnet-cpu:TAG] [--timeout 600]

- runtime ``tensorflow`` (the default): KServe's TensorFlow runtime (TensorFlow Serving) loads
  the SavedModel from ``storageUri``, the export's prefix (``hrnet export`` wrote its ``1/``),
  read with the S3 Secret of the ``hrnet-serving`` ServiceAccount (manifests/kserve). Requests
  in TensorFlow Serving's REST API, the ``classify_bytes`` signature taking JPEG/PNG bytes.
- runtime ``hrnet``: the project's image running ``hrnet serve --model URI`` (the same V1 path
  and V2; class names in the answer), reading the store with the steps' own Secret.

An InferenceService of that name that hrnet made (the ``hrnet.io/inference-service`` label) has
its spec replaced, and KServe rolls out a new revision; one without the label is left alone:
an error, never overwritten. Then it waits until the service is Ready (its URL is the result),
KServe reports that the model cannot load (``modelStatus``: BlockedByFailedLoad or
InvalidSpec, with the failure's reason and message), or ``timeout`` passes (the Ready
condition's last reason named). The kubernetes package is imported only here.

manifests/kserve/inferenceservice.yaml is :func:`inference_service`'s object for users who apply
it by hand (tests/test_deploy.py compares them).
"""
import argparse
import logging
import re
import sys
import time
from typing import Any, Dict, Optional, Tuple

from hrnet.errors import HrnetError
from hrnet.runtime import cluster

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"
# The API calls deploy makes: manifests/base/rbac.yaml grants exactly these (tests/test_jobs.py).
PERMISSIONS = ((GROUP, PLURAL, ("create", "get", "update")),)
LABEL = "hrnet.io/inference-service"
RUNTIMES = ("tensorflow", "hrnet")
# The ServiceAccount whose S3 Secret KServe's storage initializer reads the export with (manifests/kserve).
SERVING_ACCOUNT = "hrnet-serving"
DEFAULT_NAME = "hrnet"
# KServe names the predictor's Knative service and its host after the InferenceService: a DNS
# label of 63 less KServe's "-predictor-" suffixes.
MAX_NAME = 45
DEFAULT_TIMEOUT = 600.0
# KServe's agent gathers concurrent requests into one call to the model.
BATCHER = {"maxBatchSize": 32, "maxLatency": 50}
RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "4", "memory": "4Gi"}}
REPLICAS = (1, 4)
# hrnet serve's port inside the container, where KServe expects a custom predictor.
PORT = 8080


class DeployFailed(HrnetError):
    """KServe could not make the service Ready, or not in time: the message says why."""


def storage_uri(uri: str) -> str:
    """``uri`` as KServe's storage initializer names it: KFP's minio:// is S3 at the store's endpoint."""
    if uri.startswith("minio://"):
        return "s3://" + uri[len("minio://"):]
    if not uri.startswith("s3://"):
        raise HrnetError(f"the export {uri!r} is not in object storage: KServe reads a model from an s3:// URI")
    return uri


def check_service(name: str, runtime: str) -> None:
    """ValueError naming a bad service name or runtime (the pipeline's validate step calls it)."""
    if not (isinstance(name, str) and len(name) <= MAX_NAME and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)):
        raise ValueError(f"the InferenceService name {name!r} must be a DNS label: lower-case letters, digits and "
                         f"'-', starting with a letter, at most {MAX_NAME} characters")
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown serving runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")


def inference_service(name: str, namespace: str, model_uri: str, runtime: str = "tensorflow",
                      image: Optional[str] = None, labelled: bool = True) -> Dict[str, Any]:
    """The InferenceService serving the export at ``model_uri`` (``labelled``: as hrnet deploy
    makes it, owning it)."""
    check_service(name, runtime)
    uri = storage_uri(model_uri)
    predictor: Dict[str, Any] = {"minReplicas": REPLICAS[0], "maxReplicas": REPLICAS[1], "batcher": dict(BATCHER)}
    if runtime == "tensorflow":
        predictor["serviceAccountName"] = SERVING_ACCOUNT
        predictor["model"] = {"modelFormat": {"name": "tensorflow"}, "storageUri": uri,
                              "resources": _copy(RESOURCES)}
    else:
        if not image:
            raise HrnetError("the hrnet serving runtime runs the project's image: give its image (--image)")
        env = [{"name": var, "valueFrom": {"secretKeyRef": {"name": cluster.OBJECT_STORE_SECRET, "key": key}}}
               for key, var in cluster.OBJECT_STORE_ENV.items()]
        predictor["serviceAccountName"] = cluster.SERVICE_ACCOUNT
        predictor["containers"] = [{
            "name": "kserve-container", "image": image,
            "args": ["hrnet", "serve", "--model", uri, "--name", name, "--port", str(PORT)],
            "ports": [{"containerPort": PORT, "protocol": "TCP"}], "env": env, "resources": _copy(RESOURCES),
            "securityContext": {"runAsUser": cluster.RUN_AS_USER, "runAsNonRoot": True,
                                "allowPrivilegeEscalation": False}}]
    labels = {"app.kubernetes.io/part-of": "hrnet", **({LABEL: name} if labelled else {})}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"predictor": predictor}}


def _copy(d: Dict[str, Dict[str, str]]) -> Dict[str, Dict[str, str]]:
    return {k: dict(v) for k, v in d.items()}


def service_state(obj: Dict[str, Any]) -> Tuple[str, str]:
    """("ready", URL) | ("failed", why) | ("waiting", why) of an InferenceService as read."""
    status = obj.get("status") or {}
    generation = (obj.get("metadata") or {}).get("generation")
    if generation is not None and status.get("observedGeneration") != generation:
        return "waiting", "KServe has not taken up this version yet"
    model = status.get("modelStatus") or {}
    if (model.get("transitionStatus") in ("BlockedByFailedLoad", "InvalidSpec")
            or (model.get("states") or {}).get("targetModelState") == "FailedToLoad"):
        info = model.get("lastFailureInfo") or {}
        why = info.get("reason") or model.get("transitionStatus") or "FailedToLoad"
        return "failed", why + (f": {info['message']}" if info.get("message") else "")
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready and ready.get("status") == "True" and status.get("url"):
        return "ready", status["url"]
    if not ready:
        return "waiting", "no Ready condition yet"
    return "waiting", ": ".join(x for x in (ready.get("reason"), ready.get("message")) if x) or "not Ready"


class Deployer:
    """Create or update one InferenceService and follow it (the steps of :func:`deploy`)."""

    def __init__(self, body: Dict[str, Any], api_client: Any = None, interval: float = 5.0):
        from kubernetes.client.rest import ApiException

        from hrnet.runtime.jobs import connect

        self.body, self.interval, self.ApiException = body, interval, ApiException
        self.api_client, self.custom, _ = connect(api_client)
        self.name, self.namespace = body["metadata"]["name"], body["metadata"]["namespace"]
        self.what = f"{KIND} {self.namespace}/{self.name}"

    def _call(self, verb: str, what: str, **kwargs: Any) -> Any:
        """One API call; a refusal or a server out of reach as one line."""
        method = getattr(self.custom, f"{verb}_namespaced_custom_object")
        try:
            return method(GROUP, VERSION, self.namespace, PLURAL, **kwargs)
        except self.ApiException as e:
            if e.status in (401, 403):
                raise HrnetError(f"not allowed to {what} (HTTP {e.status}): the ServiceAccount needs the verbs in "
                                 "manifests/base/rbac.yaml") from None
            if e.status == 404 and verb == "create":
                raise HrnetError(f"cannot {what}: the API has no InferenceService (HTTP 404); is KServe installed?") \
                    from None
            raise
        except Exception as e:  # urllib3's MaxRetryError, socket and DNS errors, timeouts
            raise HrnetError(f"cannot reach the Kubernetes API at {self.api_client.configuration.host} to {what}: "
                             f"{type(e).__name__}") from None

    def get(self) -> Optional[Dict[str, Any]]:
        try:
            return self._call("get", f"read {self.what}", name=self.name)
        except self.ApiException as e:
            if e.status == 404:
                return None
            raise HrnetError(f"cannot read {self.what}: HTTP {e.status} {e.reason}") from None

    def apply(self) -> Dict[str, Any]:
        """Create the service, or replace the spec of the one hrnet made before."""
        for _ in range(5):  # lost races: made or changed meanwhile by someone else
            existing = self.get()
            try:
                if existing is None:
                    made = self._call("create", f"create {self.what}", body=self.body)
                    log.info("created %s serving %s", self.what, _model_uri(self.body))
                    return made
                labels = (existing.get("metadata") or {}).get("labels") or {}
                if labels.get(LABEL) != self.name:
                    raise HrnetError(f"{self.what} exists and was not made by hrnet deploy (no {LABEL} label); it is "
                                     "left alone: choose another name, or delete it yourself")
                body = dict(self.body, metadata=dict(self.body["metadata"],
                                                     resourceVersion=existing["metadata"]["resourceVersion"]))
                made = self._call("replace", f"update {self.what}", name=self.name, body=body)
                log.info("updated %s to serve %s", self.what, _model_uri(self.body))
                return made
            except self.ApiException as e:
                if e.status != 409:
                    raise HrnetError(f"cannot apply {self.what}: HTTP {e.status} {e.reason}") from None
        raise HrnetError(f"cannot apply {self.what}: it kept changing under this step (HTTP 409 five times)")

    def follow(self, made: Dict[str, Any], timeout: float) -> str:
        """The service's URL once Ready (DeployFailed if it fails or does not get there in time)."""
        deadline = time.monotonic() + timeout
        obj, said = made, None
        while True:
            state, detail = service_state(obj)
            if state == "ready":
                log.info("%s is ready at %s", self.what, detail)
                return detail
            if state == "failed":
                raise DeployFailed(f"{self.what} failed: {detail}")
            if detail != said:
                log.info("%s: waiting (%s)", self.what, detail)
                said = detail
            if time.monotonic() >= deadline:
                raise DeployFailed(f"{self.what} was not Ready after {timeout:g} s ({detail})")
            time.sleep(min(self.interval, max(0.0, deadline - time.monotonic())))
            obj = self.get()
            if obj is None:
                raise DeployFailed(f"{self.what} was deleted while this step waited for it")


def _model_uri(body: Dict[str, Any]) -> str:
    predictor = body["spec"]["predictor"]
    if "model" in predictor:
        return predictor["model"]["storageUri"]
    args = predictor["containers"][0]["args"]
    return args[args.index("--model") + 1]


def deploy(body: Dict[str, Any], api_client: Any = None, timeout: float = DEFAULT_TIMEOUT,
           interval: float = 5.0) -> str:
    """Create or update the InferenceService ``body`` and wait until it is Ready: its URL."""
    if not timeout > 0:
        raise HrnetError(f"the deploy timeout must be a positive number of seconds, got {timeout!r}")
    deployer = Deployer(body, api_client, interval)
    return deployer.follow(deployer.apply(), timeout)


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the export's s3:// / minio:// URI (hrnet export's output)")
    parser.add_argument("--name", default=DEFAULT_NAME, help="the InferenceService's name (default: %(default)s)")
    parser.add_argument("--namespace", default=None,
                        help="default: this pod's ($POD_NAMESPACE, the service account's), else default")
    parser.add_argument("--runtime", choices=RUNTIMES, default="tensorflow",
                        help="tensorflow: KServe's TensorFlow Serving; hrnet: the project's image running hrnet serve")
    parser.add_argument("--image", help="the image for --runtime hrnet (the cpu or gpu hrnet image)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds to wait until the service is Ready (default: %(default)g)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between looks at the service")


def run(args: argparse.Namespace) -> int:
    from hrnet.runtime.ranktable import pod_namespace

    body = inference_service(args.name, args.namespace or pod_namespace(), args.model, args.runtime, args.image)
    try:
        url = deploy(body, timeout=args.timeout, interval=args.interval)
    except DeployFailed as e:
        print(f"hrnet deploy: {e}", file=sys.stderr)
        return 1
    print(url)
    return 0
