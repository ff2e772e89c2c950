"""``hrnet submit-job``: training on several servers as a job of the cluster's own engine.

    hrnet submit-job --target ascend --nodes 2 --devices 8 --image REPO/hrnet-ascend:TAG \\
        --name hrnet-w18-2x8 -- hrnet train --device npu --data s3://... --out s3://...

One pod per server, each running ``hrnet launch --nproc DEVICES -- COMMAND``, on:

- ascend: a Volcano Job (``batch.volcano.sh/v1alpha1``), gang-scheduled, labelled for Ascend's
  hccl-controller, which writes the job's HCCL rank table into the ConfigMap
  ``rings-config-<job>`` mounted in every pod (created here, owned by the job so that it goes
  with it); ``hrnet launch`` picks this server's chips from it by the node IP (XDL_IP). One
  lost pod breaks the HCCL ring, so Volcano restarts the whole job (``max_retry`` times) and
  training resumes from its last checkpoint in ``--out``.
- gpu, cpu: a TFJob (``kubeflow.org/v1``, Kubeflow's training operator v1.x), whose workers get
  TF_CONFIG from the operator; ``hrnet launch`` shares each worker's place out among its
  ``--nproc`` processes. Not Kubeflow Trainer v2's TrainJob: its runtimes have no TensorFlow
  policy that sets TF_CONFIG (TensorFlow runs there only through MPI/Horovod), and
  MultiWorkerMirroredStrategy needs TF_CONFIG. A failed worker fails the TFJob (restart policy
  Never: a worker restarted alone cannot rejoin the collective), and the pipeline's retry of
  the step creates it again, resuming from the checkpoint.

The launcher (:func:`run_job`):

1. creates the job under the caller's name (the pipeline's: after the run, so that a retried
   step finds its job), labelled ``hrnet.io/job=<name>``. A job of that name that carries the
   label is attached to (a retried step), a failed one is replaced (the retry's purpose), and
   one without the label is left alone: an error, never overwritten;
2. follows it: the chief's (``<job>-worker-0``) log lines as they come, each pod problem once
   with the pod's own reason (unschedulable, image pull, OOM-killed, evicted, a failed
   container), and the engine's verdict; it gives up after ``start_timeout`` seconds without
   every pod running, or ``timeout`` in all;
3. deletes the job when it failed, timed out, or the launcher was told to stop (SIGTERM: the
   run was cancelled). A job that succeeded stays until its ``ttlSecondsAfterFinished`` so its
   pods' logs can be read.

The job writes its checkpoint to object storage (``--out`` must be an s3:// / minio:// URI: the
servers share no disk); the pipeline's step then publishes it as its Model. The kubernetes
package is imported only when a job is run; the objects (hrnet.runtime.job_objects) are plain dicts.
"""
import argparse
import datetime
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import IO, Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

from hrnet.errors import HrnetError
from hrnet.runtime import cluster
from hrnet.runtime.job_objects import ENGINES, JOB_LABEL, MAX_NAME, JobSpec, job_object, job_phase

log = logging.getLogger(__name__)

# The API calls run_job makes, as (API group, resource, verbs): manifests/base/rbac.yaml grants
# exactly these to the ServiceAccount (tests/test_jobs.py compares the two).
PERMISSIONS = (
    ("batch.volcano.sh", "jobs", ("create", "get", "delete")),
    ("kubeflow.org", "tfjobs", ("create", "get", "delete")),
    ("", "configmaps", ("create",)),
    ("", "pods", ("list",)),
    ("", "pods/log", ("get",)),
)

# Pod problems that will not go away by waiting: fail at once.
FATAL_WAITING = {"InvalidImageName", "CreateContainerConfigError", "ErrImageNeverPull"}
class JobFailed(HrnetError):
    """The job ran and failed, timed out or was stopped: the message says why."""


# ----------------------------------------------------------------------------- reading state

def pod_problems(pod: Mapping[str, Any]) -> List[Tuple[str, bool]]:
    """(what is wrong with ``pod``, fatal) in the pod's own words: scheduling, image pulls,
    failed or OOM-killed containers, eviction. Fatal: waiting will not fix it."""
    name = (pod.get("metadata") or {}).get("name", "?")
    status = pod.get("status") or {}
    found = []
    if status.get("reason") == "Evicted":
        found.append((f"pod {name} was evicted: {status.get('message', '')}".rstrip(": "), False))
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason"):
            found.append((f"pod {name} cannot be scheduled ({c['reason']}): {c.get('message', '')}".rstrip(": "),
                          False))
    for cs in status.get("containerStatuses") or []:
        for when, state in (("", cs.get("state") or {}), ("earlier: ", cs.get("lastState") or {})):
            waiting, ended = state.get("waiting"), state.get("terminated")
            if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
                reason = waiting["reason"]
                found.append((f"pod {name}: {when}container {cs.get('name')} waiting: {reason}"
                              + (f": {waiting['message']}" if waiting.get("message") else ""),
                              reason in FATAL_WAITING))
            if ended and ended.get("exitCode", 0) != 0:
                found.append((f"pod {name}: {when}container {cs.get('name')} ended: {ended.get('reason') or 'Error'} "
                              f"(exit code {ended.get('exitCode')})"
                              + (f": {ended['message'].strip()}" if ended.get("message") else ""), False))
    return found


def _timestamp(text: str) -> Tuple[int, int]:
    """An RFC 3339 timestamp with up to nanoseconds (the API server's log timestamps) as (seconds, ns)."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$", text)
    if not m:
        raise ValueError(text)
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    when = datetime.datetime.fromisoformat(m.group(1) + zone)
    return int(when.timestamp()), int((m.group(2) or "0").ljust(9, "0"))


class LogFollower:
    """New lines of one pod's log on each ``poll``, read with timestamps so that a re-read
    (bounded by sinceSeconds) prints nothing twice; a new pod of the same name (a restarted
    Volcano job) starts over."""

    def __init__(self, core: Any, namespace: str, out: IO[str]):
        self.core, self.namespace, self.out = core, namespace, out
        self.uid: Optional[str] = None
        self.last: Tuple[int, int] = (0, 0)
        self.at_last = 0  # lines already printed with the timestamp self.last
        self.read_at: Optional[float] = None

    def poll(self, pod: Mapping[str, Any]) -> None:
        uid = pod["metadata"].get("uid")
        if uid != self.uid:
            self.uid, self.last, self.at_last, self.read_at = uid, (0, 0), 0, None
        if (pod.get("status") or {}).get("phase") == "Pending":
            return
        kwargs: Dict[str, Any] = {"timestamps": True, "_preload_content": False, "_request_timeout": 30}
        if self.read_at is not None:
            kwargs["since_seconds"] = int(time.time() - self.read_at) + 60
        started = time.time()
        response = self.core.read_namespaced_pod_log(pod["metadata"]["name"], self.namespace, **kwargs)
        text = response.data.decode("utf-8", "replace")
        self.read_at = started
        counts: Dict[Tuple[int, int], int] = {}
        for line in text.splitlines():
            stamp, _, rest = line.partition(" ")
            try:
                when = _timestamp(stamp)
            except ValueError:
                when, rest = self.last, line
            counts[when] = counts.get(when, 0) + 1
            if when < self.last or (when == self.last and counts[when] <= self.at_last):
                continue
            if when > self.last:
                self.last, self.at_last = when, 0
            self.at_last += 1
            self.out.write(rest + "\n")
        self.out.flush()


# ----------------------------------------------------------------------------- running

class _Stop(Exception):
    pass


class ApiUnreachable(HrnetError):
    """The API server did not answer (connection refused, DNS, timeouts)."""


# How long following a job rides out an API server that does not answer (an upgrade, a
# restart) before it gives up; the job itself runs on meanwhile.
API_OUTAGE = 600.0


def connect(api_client: Any = None) -> Tuple[Any, Any, Any]:
    """(ApiClient, CustomObjectsApi, CoreV1Api): ``api_client``'s, else the pod's service
    account's, else the kubeconfig's."""
    from kubernetes import client as k8s

    if api_client is None:
        from kubernetes import config as k8s_config

        try:
            k8s_config.load_incluster_config()
        except k8s_config.ConfigException:
            try:
                # Read KUBECONFIG now: the package reads it once, when first imported.
                k8s_config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
            except (k8s_config.ConfigException, OSError) as e:
                raise HrnetError(f"cannot reach the Kubernetes API (no in-cluster service account, no kubeconfig): "
                                 f"{e}") from None
        api_client = k8s.ApiClient()
    return api_client, k8s.CustomObjectsApi(api_client), k8s.CoreV1Api(api_client)


def _api_error(e: Exception, what: str) -> HrnetError:
    status = getattr(e, "status", None)
    if status in (401, 403):
        return HrnetError(f"not allowed to {what} (HTTP {status}): the ServiceAccount needs the verbs in "
                          "manifests/base/rbac.yaml")
    if status == 404 and "create" in what:
        return HrnetError(f"cannot {what}: the API has no such resource (HTTP 404); is the engine installed "
                          "(Volcano for ascend, Kubeflow's training operator for gpu / cpu)?")
    reason = getattr(e, "reason", None) or type(e).__name__
    return HrnetError(f"cannot {what}: {f'HTTP {status} ' if status else ''}{reason}")


class JobRunner:
    """Create-or-attach, follow and clean up one job (the steps of :func:`run_job`)."""

    def __init__(self, spec: JobSpec, api_client: Any = None, out: IO[str] = sys.stdout, interval: float = 5.0):
        from kubernetes.client.rest import ApiException

        self.spec, self.out, self.interval = spec, out, interval
        self.ApiException = ApiException
        self.api_client, self.custom, self.core = connect(api_client)
        self.reported: Set[str] = set()

    def _reach(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``call``, with a failure to reach the API server as ApiUnreachable (HTTP errors pass)."""
        try:
            return call(*args, **kwargs)
        except self.ApiException:
            raise
        except Exception as e:  # urllib3's MaxRetryError, socket and DNS errors, timeouts
            host = self.api_client.configuration.host
            raise ApiUnreachable(f"cannot reach the Kubernetes API at {host}: {type(e).__name__}") from None

    def _job_call(self, verb: str, **kwargs: Any) -> Any:
        e = self.spec.engine
        method = getattr(self.custom, f"{verb}_namespaced_custom_object")
        return self._reach(method, e.group, e.version, self.spec.namespace, e.plural, **kwargs)

    def get(self) -> Optional[Dict[str, Any]]:
        try:
            return self._job_call("get", name=self.spec.name)
        except self.ApiException as e:
            if e.status == 404:
                return None
            raise _api_error(e, f"read {self._what()}") from None

    def _what(self) -> str:
        return f"{self.spec.engine.kind} {self.spec.namespace}/{self.spec.name}"

    def create_or_attach(self) -> Dict[str, Any]:
        """The job: the one this step created before (a retry), else a new one."""
        existing = self.get()
        if existing is not None:
            labels = (existing.get("metadata") or {}).get("labels") or {}
            if labels.get(JOB_LABEL) != self.spec.name:
                raise HrnetError(f"{self._what()} exists and was not made by hrnet (no {JOB_LABEL} label); "
                                 "it is left alone: choose another job name")
            phase, words = job_phase(self.spec.engine, existing)
            if phase != "failed":
                log.info("attaching to %s, which exists already (%s)", self._what(), words)
                return existing
            log.info("%s failed before (%s): replacing it; training resumes from its last checkpoint",
                     self._what(), words)
            self.delete(wait=True)
        body = job_object(self.spec)
        try:
            job = self._job_call("create", body=body)
        except self.ApiException as e:
            if e.status == 409:  # made meanwhile by another attempt of this step
                return self.create_or_attach()
            raise _api_error(e, f"create {self._what()}") from None
        log.info("created %s: %d node(s) x %d %s device(s)", self._what(), self.spec.nodes, self.spec.devices,
                 self.spec.device)
        for companion in self.spec.engine.companions(self.spec, job):
            self._create_config_map(companion)
        return job

    def _create_config_map(self, body: Mapping[str, Any]) -> None:
        try:
            self._reach(self.core.create_namespaced_config_map, self.spec.namespace, body)
        except self.ApiException as e:
            if e.status != 409:
                raise _api_error(e, f"create ConfigMap {body['metadata']['name']}") from None

    def delete(self, wait: bool = False, timeout: float = 120.0) -> None:
        try:
            self._job_call("delete", name=self.spec.name, body={"propagationPolicy": "Background"})
        except ApiUnreachable as e:
            log.error("could not delete %s: %s; delete it with kubectl", self._what(), e)
            return
        except self.ApiException as e:
            if e.status != 404:
                log.error("could not delete %s: HTTP %s %s", self._what(), e.status, e.reason)
                return
        log.info("deleted %s", self._what())
        deadline = time.monotonic() + timeout
        while wait and self.get() is not None and time.monotonic() < deadline:
            time.sleep(min(self.interval, 1.0))

    def pods(self) -> List[Dict[str, Any]]:
        try:
            listed = self._reach(self.core.list_namespaced_pod, self.spec.namespace,
                                 label_selector=f"{JOB_LABEL}={self.spec.name}")
        except self.ApiException as e:
            raise _api_error(e, f"list the pods of {self._what()}") from None
        return [self.api_client.sanitize_for_serialization(p) for p in listed.items]

    def follow(self, timeout: float = 0.0, start_timeout: float = 1800.0,
               stopped: Callable[[], Optional[int]] = lambda: None) -> None:
        """Until the job succeeds (returns) or fails, times out or ``stopped()`` says a signal (JobFailed)."""
        logs = LogFollower(self.core, self.spec.namespace, self.out)
        began = time.monotonic()
        all_running_once = False
        unreachable_since: Optional[float] = None
        while True:
            signum = stopped()
            if signum:
                raise _Stop(signum)
            try:
                job, pods = self.get(), self.pods()
                unreachable_since = None
            except ApiUnreachable as e:
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > API_OUTAGE:
                    raise JobFailed(f"{e} for {API_OUTAGE:.0f} s; the job may still run") from None
                log.warning("%s; trying again", e)
                time.sleep(self.interval)
                continue
            if job is None:
                raise JobFailed(f"{self._what()} was deleted by someone else")
            phase, words = job_phase(self.spec.engine, job)
            fatal = self._report(pods)
            chief = next((p for p in pods if p["metadata"]["name"] == self.spec.chief), None)
            if chief is not None:
                try:
                    logs.poll(chief)
                except Exception as e:  # a log read is best-effort; the job's state decides
                    log.debug("reading %s's log: %s", self.spec.chief, e)
            if phase == "succeeded":
                log.info("%s succeeded", self._what())
                return
            if phase == "failed":
                raise JobFailed(f"{self._what()} failed: {words}{self._reasons()}")
            if fatal:
                raise JobFailed(f"{self._what()} cannot run: {fatal}")
            running = len(pods) == self.spec.nodes and all((p.get("status") or {}).get("phase") in
                                                           ("Running", "Succeeded") for p in pods)
            all_running_once = all_running_once or running
            elapsed = time.monotonic() - began
            if not all_running_once and start_timeout and elapsed > start_timeout:
                raise JobFailed(f"{self._what()}: not all {self.spec.nodes} pods running after {start_timeout:.0f} s "
                                f"({words}){self._reasons()}")
            if timeout and elapsed > timeout:
                raise JobFailed(f"{self._what()} still {words} after the timeout of {timeout:.0f} s")
            time.sleep(self.interval)

    def _report(self, pods: List[Dict[str, Any]]) -> Optional[str]:
        fatal = None
        for pod in pods:
            for problem, is_fatal in pod_problems(pod):
                if problem not in self.reported:
                    self.reported.add(problem)
                    log.warning("%s", problem)
                if is_fatal and fatal is None:
                    fatal = problem
        return fatal

    def _reasons(self) -> str:
        return ("; " + "; ".join(sorted(self.reported))) if self.reported else ""


def run_job(spec: JobSpec, api_client: Any = None, timeout: float = 0.0, start_timeout: float = 1800.0,
            interval: float = 5.0, out: IO[str] = sys.stdout) -> None:
    """Create (or re-attach to) the job, follow it to success, else delete it and raise JobFailed.

    SIGTERM / SIGINT while following (a cancelled run) delete the job, then raise JobFailed."""
    runner = JobRunner(spec, api_client=api_client, out=out, interval=interval)
    received: List[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        runner.create_or_attach()
        runner.follow(timeout=timeout, start_timeout=start_timeout, stopped=lambda: received[0] if received else None)
    except _Stop as stop:
        runner.delete()
        raise JobFailed(f"stopped by {signal.Signals(stop.args[0]).name}: deleted {runner._what()}") from None
    except JobFailed:
        runner.delete()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def check_remote(uri: str, what: str) -> str:
    """``uri``, if the servers of a job can all reach it (object storage)."""
    from hrnet import storage

    if not storage.is_remote(uri):
        raise HrnetError(f"{what} {uri!r} is a local path, but the servers of a multi-node job share no disk: use an "
                         "s3:// or minio:// URI (nodes > 1 needs object storage)")
    return uri


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", choices=sorted(ENGINES), required=True,
                        help="ascend: a Volcano Job (hccl-controller rank table); gpu, cpu: a TFJob")
    parser.add_argument("--nodes", type=int, required=True, help="servers (one pod each)")
    parser.add_argument("--devices", type=int, default=1, help="devices per server: 1, 2, 4 or 8 (default 1)")
    parser.add_argument("--image", required=True, help="the image the pods run (the target's hrnet image)")
    parser.add_argument("--name", required=True, help=f"the job's name (a DNS label of at most {MAX_NAME} characters); "
                                                      "submitting the same name again attaches to that job")
    parser.add_argument("--namespace", default=None, help="default: this pod's ($POD_NAMESPACE, the service "
                        "account's), else default")
    parser.add_argument("--service-account", default=cluster.SERVICE_ACCOUNT)
    parser.add_argument("--secret", default=cluster.OBJECT_STORE_SECRET, help="the object-store credentials' Secret")
    parser.add_argument("--queue", default="default", help="Volcano queue (ascend)")
    parser.add_argument("--max-retry", type=int, default=3,
                        help="restarts of the whole job after a lost pod (Volcano maxRetry; TFJob backoffLimit)")
    parser.add_argument("--timeout", type=float, default=0.0, help="seconds the whole job may take (0: no limit)")
    parser.add_argument("--start-timeout", type=float, default=1800.0,
                        help="seconds until every pod runs (unschedulable, image pulls; default 1800)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between looks at the job")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="each process's command, after --, e.g. -- hrnet train --data s3://... --out s3://...")


def run(args: argparse.Namespace) -> int:
    from hrnet.runtime.ranktable import pod_namespace

    namespace = args.namespace or pod_namespace()
    spec = JobSpec(name=args.name, target=args.target, nodes=args.nodes, devices=args.devices, image=args.image,
                   command=list(args.command), namespace=namespace, service_account=args.service_account,
                   secret=args.secret, queue=args.queue, max_retry=args.max_retry)
    try:
        run_job(spec, timeout=args.timeout, start_timeout=args.start_timeout, interval=args.interval)
    except JobFailed as e:
        print(f"hrnet submit-job: {e}", file=sys.stderr)
        return 1
    return 0

