"""A stand-in for a Kubernetes API server with Volcano + hccl-controller, Kubeflow's training
operator and the kubelets behind it: the one part of a multi-node run that cannot be real here.

It serves, over real HTTP to the real ``kubernetes`` client, exactly the calls
hrnet.runtime.jobs makes (create / get / delete of Volcano Jobs and TFJobs, create of
ConfigMaps, list of pods by label, a pod's log with timestamps and sinceSeconds), records
every object created, and plays the controllers:

- a job's pods are ``<job>-worker-<i>``, run as local processes (the container's args, with
  ``hrnet`` as this interpreter's ``-m hrnet``) with the environment the real controllers
  give: the container's env, secretKeyRefs from ``secrets``, ``status.hostIP`` as
  ``node_ips[i]``, Volcano's chip annotation ``Ascend910-0,...``;
- Volcano: once the ``rings-config-<job>`` ConfigMap exists (the kubelet would not start a
  pod whose ConfigMap volume is missing), hccl-controller's rank table (one server per pod,
  server_id the node IP, global rank ids) is written to a file that stands for the mounted
  ConfigMap, and RANK_TABLE_FILE points there; first ``"status": "initializing"``, completed
  a moment later, as hccl-controller does;
- TFJob: TF_CONFIG as the operator writes it, with ``localhost:<port>`` where the operator
  names each worker's Service ``<job>-worker-<i>.<ns>.svc:2222``;
- status: pods Pending -> Running -> Succeeded / Failed (the exit code, ``OOMKilled`` when
  :meth:`oom_kill` killed one); the Volcano Job's ``state.phase`` / the TFJob's conditions
  follow (a failed pod fails the job: Volcano's RestartJob retries are not played);
- ``unschedulable``: pods stay Pending with the scheduler's PodScheduled=False condition;
- delete: the job's pods are killed and removed, and ConfigMaps it owns go with it;
- KServe: InferenceServices created, read and replaced (PUT with the resourceVersion read, a
  stale one refused with 409, ``metadata.generation`` bumped by each replace) and a controller
  that reports each generation as KServe does: first Ready=False and the model InProgress, then,
  after ``isvc_delay`` seconds, Ready with ``status.url``, or, where ``isvc_check(body)`` returns
  a message (a test looks in the store for the model), BlockedByFailedLoad with that message
  as ``lastFailureInfo`` (reason ModelLoadFailed); ``isvc_check`` returning None forever means
  ready, ``isvc_stuck`` keeps every service waiting. No predictor pod runs.

Not real: scheduling, networking between pods, restarts, watches, admission and the CRDs'
schemas (test_jobs validates the objects it is given against the projects' CRDs in
../shared/crds, tests/crd_schema.py).
"""
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional
from urllib.parse import parse_qs, urlparse

import yaml

from hrnet.runtime.launch import free_ports

JOB_PLURALS = {("batch.volcano.sh", "jobs"): "volcano", ("kubeflow.org", "tfjobs"): "tfjob"}


def _now() -> str:
    # RFC 3339 with nanoseconds, trailing zeros trimmed, as the API server writes log timestamps.
    t = time.time()
    frac = f"{int((t % 1) * 1e9):09d}".rstrip("0")
    base = datetime.datetime.fromtimestamp(int(t), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return base + (f".{frac}" if frac else "") + "Z"


class Pod:
    def __init__(self, name: str, job: Dict[str, Any], index: int, template: Dict[str, Any]):
        self.name, self.job, self.index, self.template = name, job, index, template
        self.uid = str(uuid.uuid4())
        self.phase = "Pending"
        self.conditions: List[Dict[str, Any]] = []
        self.waiting: Optional[Dict[str, str]] = {"reason": "ContainerCreating"}
        self.terminated: Optional[Dict[str, Any]] = None
        self.lines: List[tuple] = []  # (timestamp, text)
        self.proc: Optional[subprocess.Popen] = None
        self.env: Dict[str, str] = {}
        self.oom = False
        self.lock = threading.Lock()

    def body(self) -> Dict[str, Any]:
        container = self.template["spec"]["containers"][0]
        state: Dict[str, Any] = {}
        if self.waiting:
            state["waiting"] = dict(self.waiting)
        elif self.terminated:
            state["terminated"] = dict(self.terminated)
        elif self.phase == "Running":
            state["running"] = {"startedAt": _now()}
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": self.name, "namespace": self.job["metadata"]["namespace"], "uid": self.uid,
                             "labels": dict(self.template["metadata"].get("labels", {}))},
                "spec": {"containers": [{"name": container["name"], "image": container["image"]}]},
                "status": {"phase": self.phase, "conditions": self.conditions,
                           "containerStatuses": [{"name": container["name"], "image": container["image"],
                                                  "imageID": "", "ready": self.phase == "Running",
                                                  "restartCount": 0, "state": state}]}}


class Cluster:
    """The API server (``configuration()`` for the kubernetes client) and its controllers."""

    def __init__(self, workdir: str, secrets: Optional[Dict[str, Dict[str, str]]] = None,
                 env: Optional[Dict[str, str]] = None, node_ips: Optional[List[str]] = None,
                 unschedulable: bool = False, image_error: Optional[str] = None, ring_delay: float = 1.0,
                 isvc_check: Any = None, isvc_delay: float = 0.5, isvc_stuck: bool = False):
        self.workdir, self.secrets = workdir, secrets or {}
        self.base_env = dict(os.environ if env is None else env)
        for k in ("TF_CONFIG", "RANK_TABLE_FILE", "RANK_ID", "RANK_SIZE", "ASCEND_VISIBLE_DEVICES",
                  "KUBERNETES_SERVICE_HOST"):
            self.base_env.pop(k, None)
        self.node_ips = node_ips or [f"10.0.0.{i + 11}" for i in range(16)]
        self.unschedulable, self.image_error, self.ring_delay = unschedulable, image_error, ring_delay
        self.isvc_check, self.isvc_delay, self.isvc_stuck = isvc_check, isvc_delay, isvc_stuck
        self.objects: Dict[tuple, Dict[str, Any]] = {}  # (plural, namespace, name) -> body
        self.created: List[Dict[str, Any]] = []
        self.replaced: List[Dict[str, Any]] = []  # each PUT's result
        self.requests: List[tuple] = []  # (method, path)
        self.pods: Dict[str, Pod] = {}
        self.lock = threading.RLock()
        self.httpd: Optional[ThreadingHTTPServer] = None

    # -------------------------------------------------------------- server
    def __enter__(self) -> "Cluster":
        self._serve(0)
        return self

    def _serve(self, port: int) -> None:
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: Any, raw: bool = False) -> None:
                data = body if raw else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if raw else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"{}")

            def do_GET(self) -> None:
                cluster.handle(self, "GET")

            def do_POST(self) -> None:
                cluster.handle(self, "POST")

            def do_DELETE(self) -> None:
                cluster.handle(self, "DELETE")

            def do_PUT(self) -> None:
                cluster.handle(self, "PUT")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def api_outage(self, seconds: float) -> None:
        """The API server goes away for ``seconds`` (an upgrade, say), then answers again on its port;
        the controllers and pods run on meanwhile."""
        port = self.httpd.server_address[1]
        self.httpd.shutdown()
        self.httpd.server_close()
        time.sleep(seconds)
        self._serve(port)

    def __exit__(self, *exc: Any) -> None:
        for pod in list(self.pods.values()):
            self._kill(pod)
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()

    def configuration(self) -> Any:
        from kubernetes import client

        c = client.Configuration()
        c.host = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        return c

    def api_client(self) -> Any:
        from kubernetes import client

        return client.ApiClient(self.configuration())

    @staticmethod
    def _status(code: int, reason: str, message: str) -> Dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
                "message": message}

    def handle(self, h: Any, method: str) -> None:
        url = urlparse(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.requests.append((method, url.path))
        m = re.fullmatch(r"/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?", url.path)
        if m and (m.group(1), m.group(4)) in JOB_PLURALS:
            group, _, ns, plural, name = m.groups()
            return self._jobs(h, method, JOB_PLURALS[(group, plural)], plural, ns, name)
        if m and (m.group(1), m.group(4)) == ("serving.kserve.io", "inferenceservices"):
            return self._inference_services(h, method, m.group(3), m.group(5))
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/configmaps", url.path)
        if m and method == "POST":
            body = h._body()
            return h._send(*self._create("configmaps", m.group(1), body))
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", url.path)
        if m and method == "GET":
            key, _, value = query.get("labelSelector", "").partition("=")
            with self.lock:
                items = [p.body() for p in self.pods.values()
                         if p.template["metadata"].get("labels", {}).get(key) == value]
            return h._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", url.path)
        if m and method == "GET":
            pod = self.pods.get(m.group(2))
            if pod is None:
                return h._send(404, self._status(404, "NotFound", f"pods {m.group(2)!r} not found"))
            since = float(query["sinceSeconds"]) if "sinceSeconds" in query else None
            stamps = query.get("timestamps") == "true"
            with pod.lock:
                lines = list(pod.lines)
            if since is not None:
                cutoff = time.time() - since
                lines = [(t, s, text) for t, s, text in lines if s >= cutoff]
            text = "".join((f"{t} {text}" if stamps else text) + "\n" for t, _, text in lines)
            return h._send(200, text.encode(), raw=True)
        h._send(404, self._status(404, "NotFound", f"no route {method} {url.path}"))

    def _create(self, plural: str, ns: str, body: Dict[str, Any]) -> tuple:
        name = body["metadata"]["name"]
        with self.lock:
            if (plural, ns, name) in self.objects:
                return 409, self._status(409, "AlreadyExists", f"{plural} {name!r} already exists")
            body = json.loads(json.dumps(body))
            body["metadata"].update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now())
            self.objects[(plural, ns, name)] = body
            self.created.append(body)
        return 201, body

    def _jobs(self, h: Any, method: str, engine: str, plural: str, ns: str, name: Optional[str]) -> None:
        if method == "POST" and name is None:
            code, body = self._create(plural, ns, h._body())
            if code == 201:
                threading.Thread(target=self._control, args=(engine, plural, ns, body["metadata"]["name"]),
                                 daemon=True).start()
            return h._send(code, body)
        key = (plural, ns, name)
        with self.lock:
            job = self.objects.get(key)
        if job is None:
            return h._send(404, self._status(404, "NotFound", f"{plural} {name!r} not found"))
        if method == "GET":
            return h._send(200, job)
        if method == "DELETE":
            self.delete_job(plural, ns, name)
            return h._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        h._send(405, self._status(405, "MethodNotAllowed", method))

    # -------------------------------------------------------------- KServe
    def _inference_services(self, h: Any, method: str, ns: str, name: Optional[str]) -> None:
        plural = "inferenceservices"
        if method == "POST" and name is None:
            body = h._body()
            body.pop("status", None)
            body["metadata"].update(generation=1, resourceVersion="1")
            code, made = self._create(plural, ns, body)
            h._send(code, made)
            if code == 201:
                self._kserve(ns, made)
            return
        with self.lock:
            obj = self.objects.get((plural, ns, name))
            if obj is None:
                return h._send(404, self._status(404, "NotFound", f"{plural}.serving.kserve.io {name!r} not found"))
            if method == "GET":
                return h._send(200, obj)
            if method != "PUT":
                return h._send(405, self._status(405, "MethodNotAllowed", method))
            body = h._body()
            if body["metadata"].get("resourceVersion") != obj["metadata"]["resourceVersion"]:
                return h._send(409, self._status(409, "Conflict", "the object has been modified; please apply "
                                                                  "your changes to the latest version"))
            meta = obj["metadata"]
            obj["spec"] = body["spec"]  # status is a subresource: a PUT of the object leaves it
            meta["labels"] = body["metadata"].get("labels", {})
            meta["generation"] += 1
            meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)
            self.replaced.append(json.loads(json.dumps(obj)))
            made = json.loads(json.dumps(obj))
        self._kserve(ns, obj)
        h._send(200, made)

    def _kserve(self, ns: str, obj: Dict[str, Any]) -> None:
        """KServe's controller on one generation of ``obj``: in progress now, settled later."""
        name, generation = obj["metadata"]["name"], obj["metadata"]["generation"]
        with self.lock:
            obj["status"] = {"observedGeneration": generation,
                             "conditions": [{"type": "Ready", "status": "False", "reason": "RevisionMissing",
                                             "message": f"Configuration \"{name}-predictor\" is waiting for a "
                                                        "Revision to become ready."}],
                             "modelStatus": {"transitionStatus": "InProgress",
                                             "states": {"activeModelState": "", "targetModelState": "Pending"}}}
        if self.isvc_stuck:
            return

        def settle() -> None:
            time.sleep(self.isvc_delay)
            problem = self.isvc_check(obj) if self.isvc_check else None
            with self.lock:
                if obj["metadata"]["generation"] != generation:
                    return  # replaced meanwhile: that generation settles itself
                if problem:
                    obj["status"]["modelStatus"] = {
                        "transitionStatus": "BlockedByFailedLoad",
                        "states": {"activeModelState": "", "targetModelState": "FailedToLoad"},
                        "lastFailureInfo": {"reason": "ModelLoadFailed", "message": problem}}
                    return
                obj["status"] = {"observedGeneration": generation, "url": f"http://{name}.{ns}.example.com",
                                 "conditions": [{"type": "Ready", "status": "True"}],
                                 "modelStatus": {"transitionStatus": "UpToDate",
                                                 "states": {"activeModelState": "Loaded",
                                                            "targetModelState": "Loaded"}}}

        threading.Thread(target=settle, daemon=True).start()

    def delete_job(self, plural: str, ns: str, name: str) -> None:
        with self.lock:
            job = self.objects.pop((plural, ns, name), None)
            if job is None:
                return
            uid = job["metadata"]["uid"]
            # The garbage collector: what the job owns goes with it.
            for k, obj in list(self.objects.items()):
                if any(o.get("uid") == uid for o in obj["metadata"].get("ownerReferences", [])):
                    del self.objects[k]
            pods = [p for p in self.pods.values() if p.job is job]
            for p in pods:
                del self.pods[p.name]
        for p in pods:
            self._kill(p)

    # -------------------------------------------------------------- controllers
    def _template(self, engine: str, job: Dict[str, Any]) -> tuple:
        if engine == "volcano":
            task = job["spec"]["tasks"][0]
            return task["replicas"], task["template"]
        worker = job["spec"]["tfReplicaSpecs"]["Worker"]
        return worker["replicas"], worker["template"]

    def _control(self, engine: str, plural: str, ns: str, name: str) -> None:
        job = self.objects[(plural, ns, name)]
        replicas, template = self._template(engine, job)
        pods = []
        with self.lock:
            for i in range(replicas):
                pod = Pod(f"{name}-worker-{i}", job, i, template)
                self.pods[pod.name] = pod
                pods.append(pod)
        self._set_job(engine, job, "Pending")
        if self.unschedulable:
            for pod in pods:
                pod.waiting = None
                pod.conditions = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                   "message": "0/3 nodes are available: 3 Insufficient huawei.com/Ascend910."}]
            return
        if self.image_error:
            image = template["spec"]["containers"][0]["image"]
            for pod in pods:
                pod.waiting = {"reason": self.image_error, "message": f"cannot pull {image}"}
            return
        container = template["spec"]["containers"][0]
        extra: Dict[int, Dict[str, str]] = {i: {} for i in range(replicas)}
        if engine == "volcano":
            ring = f"rings-config-{name}"
            while (("configmaps", ns, ring) not in self.objects) and (plural, ns, name) in self.objects:
                time.sleep(0.05)
            table_file = os.path.join(self.workdir, f"{name}-hccl.json")
            with open(table_file, "w") as f:
                json.dump({"status": "initializing"}, f)
            threading.Thread(target=self._hccl_controller, args=(table_file, replicas, container), daemon=True).start()
            for i in range(replicas):
                extra[i]["RANK_TABLE_FILE"] = table_file
        else:
            ports = free_ports(replicas)
            for i in range(replicas):
                extra[i]["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                                                    "task": {"type": "worker", "index": i},
                                                    "environment": "cloud"})
        for pod in pods:
            if (plural, ns, name) not in self.objects:
                return
            env = dict(self.base_env)
            env.update(self._container_env(container, pod, ns))
            env.update(extra[pod.index])
            pod.env = env
            args = list(container.get("command", [])) + list(container.get("args", []))
            if args[0] == "hrnet":
                args = [sys.executable, "-m", "hrnet"] + args[1:]
            pod.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            pod.waiting, pod.phase = None, "Running"
            threading.Thread(target=self._pump, args=(pod,), daemon=True).start()
        self._set_job(engine, job, "Running")
        for pod in pods:
            threading.Thread(target=self._reap, args=(engine, job, pod), daemon=True).start()

    def _hccl_controller(self, path: str, replicas: int, container: Dict[str, Any]) -> None:
        time.sleep(self.ring_delay)
        devices = int(container["resources"]["limits"]["huawei.com/Ascend910"])
        servers = [{"server_id": self.node_ips[i],
                    "device": [{"device_id": str(d), "device_ip": f"192.168.{100 + d}.{i + 1}",
                                "rank_id": str(i * devices + d)} for d in range(devices)]}
                   for i in range(replicas)]
        table = {"status": "completed", "version": "1.0", "server_count": str(replicas), "server_list": servers}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(table, f)
        os.replace(tmp, path)

    def _container_env(self, container: Dict[str, Any], pod: Pod, ns: str) -> Dict[str, str]:
        env = {}
        devices = container["resources"]["limits"].get("huawei.com/Ascend910")
        for e in container.get("env", []):
            if "value" in e:
                env[e["name"]] = str(e["value"])
                continue
            source = e["valueFrom"]
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                env[e["name"]] = self.secrets[ref["name"]][ref["key"]]
            elif source["fieldRef"]["fieldPath"] == "status.hostIP":
                env[e["name"]] = self.node_ips[pod.index]
            elif source["fieldRef"]["fieldPath"] == "metadata.annotations['huawei.com/Ascend910']":
                env[e["name"]] = ",".join(f"Ascend910-{d}" for d in range(int(devices)))
            else:
                raise AssertionError(f"the stand-in cannot resolve {source}")
        return env

    def _pump(self, pod: Pod) -> None:
        for raw in pod.proc.stdout:
            with pod.lock:
                pod.lines.append((_now(), time.time(), raw.decode("utf-8", "replace").rstrip("\n")))

    def _reap(self, engine: str, job: Dict[str, Any], pod: Pod) -> None:
        code = pod.proc.wait()
        exit_code = 128 - code if code < 0 else code
        reason = "OOMKilled" if pod.oom else ("Completed" if code == 0 else "Error")
        pod.terminated = {"exitCode": exit_code, "reason": reason}
        pod.phase = "Succeeded" if code == 0 else "Failed"
        with self.lock:
            if job is not self.objects.get(self._key(job)):
                return
            pods = [p for p in self.pods.values() if p.job is job]
            if any(p.phase == "Failed" for p in pods):
                self._set_job(engine, job, "Failed", f"pod {pod.name} failed")
                for p in pods:  # the engine stops the others (Volcano's policy, TFJob's failure)
                    self._kill(p, signal.SIGTERM)
            elif all(p.phase == "Succeeded" for p in pods):
                self._set_job(engine, job, "Completed")

    @staticmethod
    def _key(job: Dict[str, Any]) -> tuple:
        plural = "jobs" if job["apiVersion"].startswith("batch.volcano.sh") else "tfjobs"
        return plural, job["metadata"]["namespace"], job["metadata"]["name"]

    def _set_job(self, engine: str, job: Dict[str, Any], phase: str, message: str = "") -> None:
        if engine == "volcano":
            job["status"] = {"state": {"phase": phase, **({"message": message} if message else {})}}
            return
        kind = {"Pending": "Created", "Running": "Running", "Completed": "Succeeded", "Failed": "Failed"}[phase]
        conditions = job.setdefault("status", {}).setdefault("conditions", [])
        for c in conditions:
            c["status"] = "False"
        conditions.append({"type": kind, "status": "True", "reason": f"TFJob{kind}",
                           **({"message": message} if message else {})})

    def _kill(self, pod: Pod, signum: int = signal.SIGKILL) -> None:
        if pod.proc and pod.proc.poll() is None:
            try:
                os.killpg(pod.proc.pid, signum)
            except ProcessLookupError:
                pass

    # -------------------------------------------------------------- test controls
    def oom_kill(self, pod_name: str) -> None:
        """Kill a pod's processes as the kernel's OOM killer would."""
        pod = self.pods[pod_name]
        pod.oom = True
        self._kill(pod)

    def wait_for(self, predicate: Any, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting in the Kubernetes stand-in")
            time.sleep(0.05)

    def live_processes(self) -> int:
        return sum(1 for p in self.pods.values() if p.proc and p.proc.poll() is None)


def write_kubeconfig(folder: Any, k8s: Optional[Cluster]) -> str:
    """A kubeconfig (in ``folder``) for the stand-in ``k8s``, or for nothing listening (None)."""
    path = os.path.join(str(folder), "kubeconfig")
    server = k8s.configuration().host if k8s else "http://127.0.0.1:1"
    with open(path, "w") as f:
        yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": server}}],
            "users": [{"name": "standin", "user": {}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin",
                                                         "namespace": "hrnet"}}]}, f)
    return path
