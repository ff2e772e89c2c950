"""Multi-node training: hrnet.runtime.jobs and the pipeline's train_job step against a stand-in
Kubernetes API (tests/k8s_standin.py) that plays Volcano + hccl-controller, the training operator
and the kubelets, with each pod's command run as real local processes.

Real: the kubernetes client over HTTP, ``hrnet launch`` reading the rank table / TF_CONFIG the
controllers give, MultiWorkerMirroredStrategy training across two "nodes", the object store
(SeaweedFS) the checkpoint is published from. Stand-in: the API server and controllers.
"""
import json
import os
import signal
import sys
import threading
import time

import crd_schema
import numpy as np
import pytest
import two_workers
import yaml
from helpers import TINY_CONFIG, write_images
from k8s_standin import Cluster, write_kubeconfig

from hrnet import storage
from hrnet.errors import HrnetError
from hrnet.runtime import cluster as names
from hrnet.runtime import job_objects, jobs
from hrnet.runtime.launch import expand_tf_config
from hrnet.serving import deploy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRETS = {names.OBJECT_STORE_SECRET: {"endpoint": "http://127.0.0.1:1", "accesskey": "a", "secretkey": "b"}}

CHILD = r'''
import json, os, sys, time
keys = ["RANK_ID", "RANK_SIZE", "DEVICE_ID", "TF_CONFIG", "XDL_IP", "S3_ENDPOINT"]
print("ENV " + json.dumps({k: os.environ.get(k) for k in keys}), flush=True)
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
'''


@pytest.fixture
def child(tmp_path):
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return [sys.executable, str(path)]


def spec(name="hrnet-train-t1", target="cpu", nodes=2, devices=1, command=("true",), **kwargs):
    return job_objects.JobSpec(name=name, target=target, nodes=nodes, devices=devices, image="repo/hrnet-cpu:1",
                        command=list(command), namespace="hrnet", **kwargs)


class Out:
    """A text stream the follower writes the chief's lines to."""

    def __init__(self):
        self.lines = []

    def write(self, text):
        self.lines += [line for line in text.splitlines() if line]

    def flush(self):
        pass


def envs_printed(lines):
    return [json.loads(line.split("ENV ", 1)[1]) for line in lines if "ENV " in line]


def pod_lines(k8s, name):
    return [text for _, _, text in k8s.pods[name].lines]


# ----------------------------------------------------------------------------- the objects

@pytest.mark.parametrize("target", ["ascend", "gpu", "cpu"])
def test_the_job_objects_are_valid_and_shaped_like_the_single_pod_step(target):
    import kubernetes_validate

    s = spec(target=target, nodes=3, devices=8 if target == "ascend" else 2, command=["hrnet", "train", "--x"])
    job = job_objects.job_object(s)
    shape = names.TRAIN_POD[target]
    if target == "ascend":
        assert job["apiVersion"] == "batch.volcano.sh/v1alpha1" and job["kind"] == "Job"
        assert job["spec"]["minAvailable"] == 3 and job["spec"]["schedulerName"] == "volcano"
        (task,) = job["spec"]["tasks"]
        assert task["replicas"] == 3
        template = task["template"]
        assert job["metadata"]["labels"]["ring-controller.atlas"] == "ascend-910"
        assert template["metadata"]["labels"]["ring-controller.atlas"] == "ascend-910"
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == job_objects.RING_VOLUME)
        assert volume["configMap"]["name"] == "rings-config-hrnet-train-t1"
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["RANK_TABLE_FILE"]["value"] == f"{job_objects.RING_MOUNT}/hccl.json"
        assert env["XDL_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    else:
        assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "TFJob"
        worker = job["spec"]["tfReplicaSpecs"]["Worker"]
        assert set(job["spec"]["tfReplicaSpecs"]) == {"Worker"}
        assert worker["replicas"] == 3 and worker["restartPolicy"] == "Never"
        template = worker["template"]
        assert template["spec"]["containers"][0]["name"] == "tensorflow"  # where the operator puts TF_CONFIG
    (container,) = template["spec"]["containers"]
    wait = ["--rank-table-timeout", "600"] if target == "ascend" else []
    assert container["args"] == ["hrnet", "launch", "--nproc", str(s.devices), "--device", shape["device"], *wait,
                                 "--", "hrnet", "train", "--x"]
    resources = container["resources"]
    # Sized for the run's devices (the single train pod: for those it was compiled for).
    sized = names.train_resources(target, s.devices)
    assert (resources["requests"]["cpu"], resources["limits"]["cpu"]) == sized["cpu"]
    assert (resources["requests"]["memory"], resources["limits"]["memory"]) == sized["memory"]
    per_device = shape["cpu_per_device"][0]
    assert int(resources["requests"]["cpu"]) == per_device * s.devices
    if shape["accelerator"]:
        assert resources["limits"][shape["accelerator"]] == s.devices
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e
                  and "secretKeyRef" in e["valueFrom"]}
    assert {v: {"name": names.OBJECT_STORE_SECRET, "key": k} for k, v in names.OBJECT_STORE_ENV.items()} == secret_env
    assert template["spec"]["serviceAccountName"] == names.SERVICE_ACCOUNT
    assert template["metadata"]["labels"][job_objects.JOB_LABEL] == s.name
    # The whole object against its project's CRD (Volcano's, the training operator v1.9's),
    # unknown fields refused; the pod template against the core schema too, which the CRDs
    # leave partly open.
    crd_schema.validate(job)
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                  "template": template}, "1.28", strict=True)


def test_the_role_grants_exactly_what_the_launcher_and_the_deploy_step_call():
    with open(os.path.join(ROOT, "manifests", "base", "rbac.yaml")) as f:
        role = next(d for d in yaml.safe_load_all(f) if d and d["kind"] == "Role")
    granted = {}
    for rule in role["rules"]:
        if "resourceNames" in rule:
            continue
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    # The launcher's calls, and besides them only get on pods (the rank table annotation) and
    # Argo's task results.
    expected = {("", "pods"): {"get"}, ("argoproj.io", "workflowtaskresults"): {"create", "patch"}}
    for group, resource, verbs in jobs.PERMISSIONS + deploy.PERMISSIONS:
        expected.setdefault((group, resource), set()).update(verbs)
    assert granted == expected


def test_job_names_are_dns_labels_made_from_the_run_id():
    name = job_objects.job_name("3F2A9C1E-77B0-4C8D-9E12-0123456789AB")
    assert name == "hrnet-train-3f2a9c1e-77b0-4c8d-9e12-0123456789a"[:job_objects.MAX_NAME].rstrip("-")
    assert len(name) <= job_objects.MAX_NAME
    with pytest.raises(HrnetError, match="DNS label"):
        spec(name="Bad_Name")
    with pytest.raises(HrnetError, match="devices .per node. must be 1, 2, 4 or 8"):
        spec(devices=3)
    with pytest.raises(HrnetError, match="nodes must be 1 or more"):
        spec(nodes=0)


def test_an_operators_tf_config_is_shared_out_among_a_nodes_processes():
    given = json.dumps({"cluster": {"worker": ["job-worker-0.ns.svc:2222", "job-worker-1.ns.svc:2222"]},
                        "task": {"type": "worker", "index": 1}, "environment": "cloud"})
    configs = [json.loads(c) for c in expand_tf_config(given, 2)]
    cluster = ["job-worker-0.ns.svc:2222", "job-worker-0.ns.svc:2223", "job-worker-1.ns.svc:2222",
               "job-worker-1.ns.svc:2223"]
    assert [c["cluster"]["worker"] for c in configs] == [cluster, cluster]
    assert [c["task"]["index"] for c in configs] == [2, 3]
    with pytest.raises(HrnetError, match="roles other than worker"):
        expand_tf_config(json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1"]},
                                     "task": {"type": "worker", "index": 0}}), 2)


def test_pod_problems_are_told_in_the_pods_own_words():
    pod = {"metadata": {"name": "j-worker-1"}, "status": {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                        "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}],
        "containerStatuses": [{"name": "tensorflow", "state": {"waiting": {"reason": "ImagePullBackOff",
                                                                           "message": "pull access denied"}},
                               "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}
    problems = jobs.pod_problems(pod)
    assert ("pod j-worker-1 cannot be scheduled (Unschedulable): 0/4 nodes are available: 4 Insufficient "
            "nvidia.com/gpu.", False) in problems
    assert ("pod j-worker-1: container tensorflow waiting: ImagePullBackOff: pull access denied", False) in problems
    assert ("pod j-worker-1: earlier: container tensorflow ended: OOMKilled (exit code 137)", False) in problems
    pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] = "InvalidImageName"
    assert any(fatal for _, fatal in jobs.pod_problems(pod))


# ----------------------------------------------------------------------------- against the stand-in

def test_volcano_job_ranks_follow_hccl_controllers_rank_table(tmp_path, child):
    out = Out()
    with Cluster(str(tmp_path), secrets=SECRETS) as k8s:
        s = spec(target="ascend", nodes=2, devices=2, command=child)
        jobs.run_job(s, api_client=k8s.api_client(), interval=0.1, out=out)
        kinds = [(o["kind"], o["metadata"]["name"]) for o in k8s.created]
        assert kinds == [("Job", "hrnet-train-t1"), ("ConfigMap", "rings-config-hrnet-train-t1")]
        job, ring = k8s.created
        # The ConfigMap goes with the job (the garbage collector follows its owner reference).
        assert ring["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
        assert json.loads(ring["data"]["hccl.json"]) == {"status": "initializing"}
        per_pod = {name: envs_printed(pod_lines(k8s, name)) for name in k8s.pods}
    # Each server's two processes have the global ranks hccl-controller gave its chips.
    assert sorted((e["XDL_IP"], e["RANK_ID"], e["DEVICE_ID"]) for e in per_pod["hrnet-train-t1-worker-0"]) == [
        ("10.0.0.11", "0", "0"), ("10.0.0.11", "1", "1")]
    assert sorted((e["XDL_IP"], e["RANK_ID"], e["DEVICE_ID"]) for e in per_pod["hrnet-train-t1-worker-1"]) == [
        ("10.0.0.12", "2", "0"), ("10.0.0.12", "3", "1")]
    assert {e["RANK_SIZE"] for envs in per_pod.values() for e in envs} == {"4"}
    assert {e["S3_ENDPOINT"] for envs in per_pod.values() for e in envs} == {"http://127.0.0.1:1"}
    # The chief's lines reached the launcher's output; the other pod's did not.
    assert sorted(e["RANK_ID"] for e in envs_printed(out.lines)) == ["0", "1"]


def test_a_pod_killed_for_memory_fails_the_job_with_its_reason_and_the_job_is_deleted(tmp_path, child):
    with Cluster(str(tmp_path), secrets=SECRETS) as k8s:
        s = spec(command=child + ["300"])

        def kill_when_running():
            k8s.wait_for(lambda: "hrnet-train-t1-worker-1" in k8s.pods and k8s.pods["hrnet-train-t1-worker-1"].proc)
            time.sleep(0.5)
            k8s.oom_kill("hrnet-train-t1-worker-1")

        threading.Thread(target=kill_when_running, daemon=True).start()
        with pytest.raises(jobs.JobFailed, match=r"failed: Failed .*pod hrnet-train-t1-worker-1: container tensorflow "
                                                 r"ended: OOMKilled \(exit code 137\)"):
            jobs.run_job(s, api_client=k8s.api_client(), interval=0.1, out=Out())
        assert ("tfjobs", "hrnet", "hrnet-train-t1") not in k8s.objects
        assert ("DELETE", "/apis/kubeflow.org/v1/namespaces/hrnet/tfjobs/hrnet-train-t1") in k8s.requests
        k8s.wait_for(lambda: k8s.live_processes() == 0, timeout=30)


def test_a_retried_launcher_reattaches_and_a_failed_job_is_replaced(tmp_path, child):
    with Cluster(str(tmp_path), secrets=SECRETS) as k8s:
        s = spec(command=child + ["1"])
        # The first launcher created the job and died.
        first = jobs.JobRunner(s, api_client=k8s.api_client(), interval=0.1)
        first.create_or_attach()
        # Its retry finds the job and follows it instead of creating a second one.
        jobs.run_job(s, api_client=k8s.api_client(), interval=0.1, out=Out())
        assert len(k8s.created) == 1
        # A job that failed is replaced by the retry (which resumes from the checkpoint).
        job = k8s.objects[("tfjobs", "hrnet", "hrnet-train-t1")]
        job["status"]["conditions"].append({"type": "Failed", "status": "True", "message": "worker 1 failed"})
        jobs.run_job(s, api_client=k8s.api_client(), interval=0.1, out=Out())
        assert len(k8s.created) == 2 and k8s.created[1]["metadata"]["uid"] != k8s.created[0]["metadata"]["uid"]


def test_following_rides_out_an_api_server_outage(tmp_path, child, caplog):
    out = Out()
    with Cluster(str(tmp_path), secrets=SECRETS) as k8s:
        def outage():
            k8s.wait_for(lambda: any(p.proc for p in list(k8s.pods.values())))
            k8s.api_outage(2.0)

        threading.Thread(target=outage, daemon=True).start()
        jobs.run_job(spec(command=child + ["4"]), api_client=k8s.api_client(), interval=0.2, out=out)
        assert ("tfjobs", "hrnet", "hrnet-train-t1") in k8s.objects  # it succeeded: nothing deleted
    assert any("cannot reach the Kubernetes API" in r.getMessage() for r in caplog.records)
    assert [e["TF_CONFIG"] is not None for e in envs_printed(out.lines)] == [True]


def test_a_job_of_that_name_made_by_someone_else_is_left_alone(tmp_path):
    with Cluster(str(tmp_path), secrets=SECRETS) as k8s:
        body = job_objects.job_object(spec(command=["sleep", "30"]))
        del body["metadata"]["labels"][job_objects.JOB_LABEL]
        from kubernetes import client

        client.CustomObjectsApi(k8s.api_client()).create_namespaced_custom_object(
            "kubeflow.org", "v1", "hrnet", "tfjobs", body)
        with pytest.raises(HrnetError, match="was not made by hrnet .* left alone"):
            jobs.run_job(spec(), api_client=k8s.api_client(), interval=0.1, out=Out())
        assert ("tfjobs", "hrnet", "hrnet-train-t1") in k8s.objects


def test_unschedulable_pods_fail_after_the_start_timeout_with_the_schedulers_reason(tmp_path):
    with Cluster(str(tmp_path), secrets=SECRETS, unschedulable=True) as k8s:
        with pytest.raises(jobs.JobFailed, match=r"not all 2 pods running after 1 s .*cannot be scheduled "
                                                 r"\(Unschedulable\): 0/3 nodes are available"):
            jobs.run_job(spec(target="ascend"), api_client=k8s.api_client(), interval=0.1, start_timeout=1, out=Out())
        assert ("jobs", "hrnet", "hrnet-train-t1") not in k8s.objects


def test_an_image_that_can_never_run_fails_at_once(tmp_path):
    with Cluster(str(tmp_path), secrets=SECRETS, image_error="InvalidImageName") as k8s:
        started = time.monotonic()
        with pytest.raises(jobs.JobFailed, match="cannot run: pod .* waiting: InvalidImageName"):
            jobs.run_job(spec(), api_client=k8s.api_client(), interval=0.1, out=Out())
        assert time.monotonic() - started < 30
        assert not k8s.objects


def test_a_cancelled_launcher_deletes_its_job(tmp_path, child):
    with Cluster(str(tmp_path), secrets=SECRETS) as k8s:
        threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(jobs.JobFailed, match="stopped by SIGTERM: deleted TFJob hrnet/hrnet-train-t1"):
            jobs.run_job(spec(command=child + ["300"]), api_client=k8s.api_client(), interval=0.1, out=Out())
        assert not k8s.objects
        k8s.wait_for(lambda: k8s.live_processes() == 0, timeout=30)


def test_the_job_times_out_as_the_user_set(tmp_path, child):
    with Cluster(str(tmp_path), secrets=SECRETS) as k8s:
        with pytest.raises(jobs.JobFailed, match="after the timeout of 2 s"):
            jobs.run_job(spec(command=child + ["300"]), api_client=k8s.api_client(), interval=0.1, timeout=2,
                         out=Out())
        assert not k8s.objects


def test_the_cli_submits_follows_and_reports_a_failure_in_one_line(tmp_path, child, capfd):
    import subprocess

    env = dict(os.environ, KUBECONFIG=write_kubeconfig(tmp_path, None))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    # No API server there: one line, exit 2.
    down = subprocess.run([sys.executable, "-m", "hrnet", "submit-job", "--target", "cpu", "--nodes", "2",
                           "--image", "x", "--name", "hrnet-cli", "--namespace", "hrnet", "--", "true"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 2 and "Traceback" not in down.stderr
    assert down.stderr.strip().splitlines()[-1] == ("hrnet submit-job: error: cannot reach the Kubernetes API at "
                                                    "http://127.0.0.1:1: MaxRetryError")
    with Cluster(str(tmp_path), secrets=SECRETS) as k8s:
        write_kubeconfig(tmp_path, k8s)

        bad = subprocess.run([sys.executable, "-m", "hrnet", "submit-job", "--target", "cpu", "--nodes", "2",
                              "--image", "x", "--name", "hrnet-cli", "--namespace", "hrnet", "--interval", "0.1",
                              "--", sys.executable, "-c", "import sys; sys.exit(3)"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1
        assert bad.stderr.strip().splitlines()[-1].startswith("hrnet submit-job: TFJob hrnet/hrnet-cli failed")
        assert "Traceback" not in bad.stderr
        good = subprocess.run([sys.executable, "-m", "hrnet", "submit-job", "--target", "ascend", "--nodes", "1",
                               "--devices", "2", "--image", "x", "--name", "hrnet-cli-2", "--namespace", "hrnet",
                               "--interval", "0.1", "--", *child], env=env, capture_output=True, text=True,
                              timeout=120)
        assert good.returncode == 0, good.stderr
        assert sorted(e["RANK_ID"] for e in envs_printed(good.stdout.splitlines())) == ["0", "1"]
        nodes = subprocess.run([sys.executable, "-m", "hrnet", "submit-job", "--target", "cpu", "--nodes", "2",
                                "--devices", "3", "--image", "x", "--name", "n", "--", "true"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert nodes.returncode == 2 and "devices (per node) must be 1, 2, 4 or 8" in nodes.stderr


# ----------------------------------------------------------------------------- training on two nodes

def test_two_nodes_train_in_sync_and_match_one_process(tmp_path, s3_env):
    """Two TFJob workers (the stand-in's pods) train with the operator's TF_CONFIG, shared out by
    ``hrnet launch``, and end where one process with the same global batch ends; rank 0's
    checkpoint is read back from the bucket. The data set and the weight dumps are
    tests/two_workers.py's (see there why the comparison is exact in principle)."""
    data = two_workers.build_dataset(tmp_path / "data")
    wrapper = tmp_path / "train_rank.py"
    wrapper.write_text(two_workers.WRAPPER)
    base = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")
    out_uri = s3_env.uri("runs/two-nodes")
    dumps = tmp_path / "dumps"
    secrets = {names.OBJECT_STORE_SECRET: {"endpoint": s3_env.env["S3_ENDPOINT"],
                                           "accesskey": s3_env.env["AWS_ACCESS_KEY_ID"],
                                           "secretkey": s3_env.env["AWS_SECRET_ACCESS_KEY"]}}
    with Cluster(str(tmp_path), secrets=secrets, env=dict(base, DUMP_DIR=str(dumps))) as k8s:
        command = [sys.executable, str(wrapper), *two_workers.train_args(data, out_uri, two_workers.BATCH)]
        single = _single_process(wrapper, data, tmp_path / "one", base)
        jobs.run_job(spec(command=command), api_client=k8s.api_client(), interval=0.5, out=Out())
        per_pod = {name: "\n".join(pod_lines(k8s, name)) for name in k8s.pods}
    assert single.returncode == 0, single.stdout + single.stderr
    init = two_workers.weights_of(tmp_path / "one", 0, "init")
    rank0, rank1 = two_workers.weights_of(dumps, 0, "final"), two_workers.weights_of(dumps, 1, "final")
    reference = two_workers.weights_of(tmp_path / "one", 0, "final")
    assert two_workers.max_diff(two_workers.weights_of(dumps, 1, "init"), init) == 0.0, per_pod
    assert two_workers.max_diff(rank0, rank1) <= 1e-6
    keys = [k for k in init if not k.endswith("moving_variance")]
    moved = np.linalg.norm(two_workers.flat(reference, keys) - two_workers.flat(init, keys))
    off = np.linalg.norm(two_workers.flat(rank0, keys) - two_workers.flat(reference, keys))
    assert moved > 1.0 and off <= 1e-2 * moved, (off, moved)
    # What the job left in the bucket is rank 0's final state.
    from hrnet import weights

    storage.restore(out_uri, str(tmp_path / "published"))
    assert two_workers.max_diff(weights.read_weights(str(tmp_path / "published" / "weights")), rank0) == 0.0


def _single_process(wrapper, data, where, env):
    import subprocess

    env = dict(env, DUMP_DIR=str(where))
    env.pop("TF_CONFIG", None)
    return subprocess.run([sys.executable, str(wrapper), *two_workers.train_args(data, where / "ckpt",
                                                                                  2 * two_workers.BATCH)],
                          env=env, capture_output=True, text=True, timeout=600)


# ----------------------------------------------------------------------------- the pipeline's step

def test_the_train_job_step_publishes_the_checkpoint_from_object_storage(tmp_path, s3_env, monkeypatch):
    """components/train_job.py as KFP runs it: a converted data set in the bucket, two CPU nodes,
    the checkpoint in the bucket copied into the step's Model artifact."""
    from kfp.dsl import Dataset, Model

    from components.train_job import train_job
    from hrnet.data.convert import convert_dataset
    from hrnet.data.reference import refer

    records = s3_env.uri("records")
    convert_dataset(write_images(tmp_path / "images"), records, train_shards=2, validation_shards=1, progress=False)
    reference = tmp_path / "dataset"
    reference.mkdir()
    refer(records, str(reference))
    config = {"model": TINY_CONFIG, "batch_size": 4, "image_size": 32, "train_steps": 2, "device": "cpu",
              "log_every": 1}
    secrets = {names.OBJECT_STORE_SECRET: {"endpoint": s3_env.env["S3_ENDPOINT"],
                                           "accesskey": s3_env.env["AWS_ACCESS_KEY_ID"],
                                           "secretkey": s3_env.env["AWS_SECRET_ACCESS_KEY"]}}
    with Cluster(str(tmp_path), secrets=secrets) as k8s:
        monkeypatch.setenv("KUBECONFIG", write_kubeconfig(tmp_path, k8s))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("POD_NAMESPACE", "hrnet")
        model = tmp_path / "model"
        checkpoints = s3_env.uri("runs/step")
        train_job.python_func(dataset=Dataset(uri=str(reference)), model=Model(uri=str(model)), config=config,
                              nodes=2, devices=1, checkpoint_uri=checkpoints, target="cpu", image="repo/hrnet-cpu:1",
                              job_name="3f2a9c1e-run", timeout=600.0)
        (job,) = k8s.created
    assert job["metadata"]["name"] == "hrnet-train-3f2a9c1e-run"
    args = job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--data") + 1] == records and args[args.index("--out") + 1] == checkpoints
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["step"] == 2 and (model / "weights.index").exists()
    # A local checkpoint location cannot work across servers: refused before any job exists.
    with pytest.raises(HrnetError, match="share no disk"):
        train_job.python_func(dataset=Dataset(uri=str(reference)), model=Model(uri=str(model)), config=config,
                              nodes=2, devices=1, checkpoint_uri=str(tmp_path / "local"), target="cpu",
                              image="x", job_name="r", timeout=0.0)


def test_the_launchers_volcano_job_agrees_with_the_manifest_users_apply():
    with open(os.path.join(ROOT, "manifests", "volcano", "train-2x8-vcjob.yaml")) as f:
        manifest = yaml.safe_load(f)
    made = job_objects.job_object(spec(name="hrnet-train-2x8", target="ascend", nodes=2, devices=8))
    for key in ("schedulerName", "minAvailable", "policies"):
        assert made["spec"][key] == manifest["spec"][key], key
    (mine,), (theirs,) = made["spec"]["tasks"], manifest["spec"]["tasks"]
    assert mine["name"] == theirs["name"] and mine["policies"] == theirs["policies"]
    pod, their_pod = mine["template"]["spec"], theirs["template"]["spec"]
    for key in ("restartPolicy", "serviceAccountName", "automountServiceAccountToken", "nodeSelector", "tolerations"):
        assert pod[key] == their_pod[key], key
    volume = lambda p: next(v for v in p["volumes"] if v["name"] == job_objects.RING_VOLUME)  # noqa: E731
    assert volume(pod) == volume(their_pod)
    (c,), (tc,) = pod["containers"], their_pod["containers"]
    env, their_env = {e["name"]: e for e in c["env"]}, {e["name"]: e for e in tc["env"]}
    for name in ("RANK_TABLE_FILE", "XDL_IP", "ASCEND_VISIBLE_DEVICES", "HRNET_CACHE_DIR",
                 *names.OBJECT_STORE_ENV.values()):
        assert env[name] == their_env[name], name
    mount = lambda c: next(m for m in c["volumeMounts"] if m["name"] == job_objects.RING_VOLUME)  # noqa: E731
    assert mount(c) == mount(tc)
    assert c["resources"]["limits"]["huawei.com/Ascend910"] == tc["resources"]["limits"]["huawei.com/Ascend910"]
    ring = job_objects.RING_LABEL[0]
    assert made["metadata"]["labels"][ring] == manifest["metadata"]["labels"][ring]
