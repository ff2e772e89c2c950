"""manifests/: the plain-object folders, the kustomize overlays, the Kubernetes schemas, the
security settings every workload must carry, and the Ascend specifics (chips, /dev/shm, the
HCCL rank table, the Volcano Job), checked with the real tools (kubectl, kubernetes-validate;
both come with the `test` extra, so a missing one fails here rather than skipping)."""
import json
import re
import socket
import subprocess
import tempfile
from pathlib import Path

import crd_schema
import kubernetes_validate
import pytest
import yaml
from helpers import tool

from components import images
from hrnet import cli

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
# The folders users apply with `kubectl apply -f manifests/<folder>`.
PLAIN = ("base", "secrets", "seaweedfs", "minio", "ascend-jobs", "volcano", "kserve")
OVERLAYS = sorted(p.parent.name for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))
NAMESPACE = "hrnet"
# The oldest Kubernetes the manifests are written for (docs/cluster.md), and the newest schema known.
KUBERNETES_VERSIONS = ("1.27", kubernetes_validate.latest_version())
CORE_GROUPS = ("v1", "apps/v1", "batch/v1", "rbac.authorization.k8s.io/v1", "networking.k8s.io/v1")
ASCEND = "huawei.com/Ascend910"
RANK_TABLE_DIR = "/user/serverid/devindex/config"


def kubectl(*args: str) -> subprocess.CompletedProcess:
    # No kubeconfig: nothing here may reach a real cluster.
    return subprocess.run([tool("kubectl"), *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "KUBECONFIG": "/nonexistent", "HOME": tempfile.gettempdir()})


def kubectl_files(folder: Path):
    """What `kubectl apply -f folder` reads: *.yaml, *.yml and *.json, not recursively."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml", ".json"))


def load_docs(path: Path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def folder_objects(folder: str):
    return [doc for f in kubectl_files(MANIFESTS / folder) for doc in load_docs(f)]


def all_objects():
    return [doc for folder in PLAIN for doc in folder_objects(folder)]


def build(path: Path):
    result = kubectl("kustomize", str(path))
    assert result.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)} failed:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d is not None]


def key(doc):
    return doc["kind"], doc["metadata"]["name"]


def pod_templates(doc):
    """(where, pod template) of a workload: Deployment / Job, or each task of a Volcano Job."""
    if doc["kind"] in ("Deployment", "Job") and doc["apiVersion"] in ("apps/v1", "batch/v1"):
        return [(doc["metadata"]["name"], doc["spec"]["template"])]
    if doc["apiVersion"].startswith("batch.volcano.sh/"):
        return [("%s/%s" % (doc["metadata"]["name"], t["name"]), t["template"]) for t in doc["spec"]["tasks"]]
    return []


def workloads():
    return [(where, tpl) for doc in all_objects() for where, tpl in pod_templates(doc)]


def containers(template):
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def quantity(value) -> float:
    """A Kubernetes quantity as a number ("500m" -> 0.5, "4Gi" -> 4 * 2**30)."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert m, f"not a quantity: {value!r}"
    units = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(m.group(1)) * units[m.group(2)]


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def hrnet_commands(container):
    """The hrnet command lines a container runs: itself, and for `hrnet launch` the one after --."""
    argv = list(container.get("command", [])) + list(container.get("args", []))
    if not argv or argv[0] != "hrnet":
        return []
    lines = [argv]
    if argv[1] == "launch" and "--" in argv:
        lines.append(argv[argv.index("--") + 1:])
    return lines


# ----------------------------------------------------------------------------- the -f folders

@pytest.mark.parametrize("folder", PLAIN)
def test_plain_folder_holds_only_kubernetes_objects(folder):
    path = MANIFESTS / folder
    assert not any((path / n).exists() for n in ("kustomization.yaml", "kustomization.yml")), \
        f"manifests/{folder} is applied with -f: its kustomization must be the extension-less 'Kustomization'"
    files = kubectl_files(path)
    assert files, f"manifests/{folder} is empty"
    for f in files:
        docs = load_docs(f)
        assert docs, f"{f.relative_to(ROOT)} holds no object"
        for doc in docs:
            where = f"{f.relative_to(ROOT)}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            assert isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str), where
            assert not doc["apiVersion"].startswith("kustomize.config.k8s.io"), where
            assert doc["metadata"].get("name"), where
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == NAMESPACE, f"{where}: namespace must be {NAMESPACE}"
    # The folder's own Kustomization (for -k and for the overlays) lists exactly what -f applies.
    kustomization = yaml.safe_load((path / "Kustomization").read_text())
    assert sorted(kustomization["resources"]) == [f.name for f in files]


@pytest.mark.parametrize("folder", PLAIN)
def test_kubectl_reads_every_object_of_the_folder(folder):
    # An unreachable API server: kubectl decodes every object, then says per object that it cannot
    # look its kind up. A file it cannot decode (a kustomization.yaml, a stray note) errs differently.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: connections to it are refused at once
    result = kubectl("apply", "--dry-run=client", "--validate=false", "-f", str(MANIFESTS / folder),
                     f"--server=http://127.0.0.1:{port}", "--request-timeout=5s")
    seen = re.findall(r'unable to recognize "([^"]+)"', result.stderr)
    other = [line for line in result.stderr.splitlines()
             if line and "unable to recognize" not in line and "memcache.go" not in line]
    assert not other, "kubectl could not read manifests/%s:\n%s" % (folder, "\n".join(other))
    expected = [str(f) for f in kubectl_files(MANIFESTS / folder) for _ in load_docs(f)]
    assert sorted(seen) == sorted(expected)


# ----------------------------------------------------------------------------- kustomize

@pytest.mark.parametrize("folder", PLAIN)
def test_each_folder_builds_with_kustomize_to_the_same_objects(folder):
    built = build(MANIFESTS / folder)
    assert sorted(map(key, built)) == sorted(map(key, folder_objects(folder)))


def test_overlays_build_with_kubectl_kustomize():
    assert {"minio", "ascend-jobs", "volcano", "kubeflow", "kserve"} <= set(OVERLAYS)
    base = {key(d) for d in folder_objects("base")}
    for name in OVERLAYS:
        built = build(MANIFESTS / "overlays" / name)
        keys = {key(d) for d in built}
        assert len(keys) == len(built), f"overlay {name} builds duplicate objects"
        if name == "kubeflow":
            # KFP's namespace and its kfp-launcher ConfigMap are KFP's own.
            assert keys == base - {("Namespace", NAMESPACE), ("ConfigMap", "kfp-launcher")}
            assert {d["metadata"]["namespace"] for d in built} == {"kubeflow"}
            binding = next(d for d in built if d["kind"] == "RoleBinding")
            assert binding["subjects"][0]["namespace"] == "kubeflow"
            role = next(d for d in built if d["kind"] == "Role")
            secrets = next(r for r in role["rules"] if r["resources"] == ["secrets"])
            assert "mlpipeline-minio-artifact" in secrets["resourceNames"]
        else:
            assert keys == base | {key(d) for d in folder_objects(name)}, f"overlay {name}"


# ----------------------------------------------------------------------------- schemas

def test_core_objects_match_the_kubernetes_schemas():
    checked = 0
    docs = all_objects() + [d for name in OVERLAYS for d in build(MANIFESTS / "overlays" / name)]
    for doc in docs:
        if doc["apiVersion"] in CORE_GROUPS:
            targets = [doc]
        elif doc["apiVersion"].startswith("serving.kserve.io/"):
            continue  # test_kserve_objects_match_kserves_crd_schema
        elif doc["apiVersion"].startswith("batch.volcano.sh/"):
            crd_schema.validate(doc)  # Volcano's CRD; the pod templates as core PodTemplates too
            targets = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": where.replace("/", "-")},
                        "template": tpl} for where, tpl in pod_templates(doc)]
        else:
            pytest.fail(f"{key(doc)}: {doc['apiVersion']} is neither a core group nor Volcano's")
        for target in targets:
            for version in KUBERNETES_VERSIONS:
                try:
                    kubernetes_validate.validate(target, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    path = "/".join(str(p) for p in e.path)
                    pytest.fail(f"{key(doc)} against Kubernetes {version}: {e.message} at {path}")
                checked += 1
    assert checked >= 2 * 20


def test_kserve_objects_match_kserves_crd_schema():
    """The InferenceService against KServe's published CRD, unknown fields refused."""
    docs = [d for d in all_objects() if d["apiVersion"].startswith("serving.kserve.io/")]
    assert [key(d) for d in docs] == [("InferenceService", "hrnet")]
    for doc in docs:
        crd_schema.validate(doc)
    # And the check can fail: a misspelt field is refused, as `kubectl apply` refuses it.
    bad = json.loads(json.dumps(docs[0]))
    bad["spec"]["predictor"]["model"]["storageURI"] = bad["spec"]["predictor"]["model"].pop("storageUri")
    with pytest.raises(AssertionError, match="storageURI"):
        crd_schema.validate(bad)


def test_the_served_export_is_read_with_kserves_s3_secret():
    objects = {key(d): d for d in all_objects()}
    isvc = objects[("InferenceService", "hrnet")]["spec"]["predictor"]
    assert isvc["model"]["modelFormat"]["name"] == "tensorflow" and isvc["model"]["storageUri"].startswith("s3://")
    account = objects[("ServiceAccount", isvc["serviceAccountName"])]
    (ref,) = account["secrets"]
    secret = objects[("Secret", ref["name"])]
    assert {"serving.kserve.io/s3-endpoint", "serving.kserve.io/s3-usehttps"} <= set(secret["metadata"]["annotations"])
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "replace-me", "AWS_SECRET_ACCESS_KEY": "replace-me"}


# ----------------------------------------------------------------------------- workloads

def test_every_workload_states_resources_and_a_security_context():
    found = workloads()
    assert len(found) >= 8
    for where, template in found:
        pod = template["spec"].get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
        assert int(pod.get("runAsUser", 0)) > 0, f"{where}: runAsUser"
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccompProfile"
        assert "automountServiceAccountToken" in template["spec"], f"{where}: say whether the pod needs the API"
        for c in containers(template):
            name = f"{where}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("readOnlyRootFilesystem") is True, name
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
            requests, limits = c["resources"]["requests"], c["resources"]["limits"]
            for resource in ("cpu", "memory"):
                assert resource in requests and resource in limits, f"{name}: {resource} request and limit"
                assert quantity(requests[resource]) <= quantity(limits[resource]), f"{name}: {resource}"
            for resource in set(requests) | set(limits):
                if "/" in resource:  # extended resources (chips) cannot be overcommitted
                    assert requests.get(resource) == limits.get(resource), f"{name}: {resource}"
            tag = c["image"].rsplit("/", 1)[-1]
            assert ":" in tag and not tag.endswith(":latest"), f"{name}: pin the image's tag ({c['image']})"


def test_hrnet_workloads_run_the_ascend_image_built_by_make_images():
    for where, template in workloads():
        for c in containers(template):
            if "hrnet" in c["image"]:
                assert c["image"] == images.IMAGES["ascend"], f"{where}: {c['image']}"
                assert "command" not in c, f"{where}: use args, so the image's entrypoint sources the CANN env"


def test_ascend_training_requests_chips_and_runs_one_process_per_chip():
    chips_seen = set()
    for where, template in workloads():
        spec = template["spec"]
        for c in spec["containers"]:
            chips = c["resources"]["requests"].get(ASCEND)
            if chips is None:
                continue
            chips = int(chips)
            chips_seen.add(chips)
            assert spec["nodeSelector"]["accelerator"] == "huawei-Ascend910", where
            volumes = {v["name"]: v for v in spec["volumes"]}
            shm = next(m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
            assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory", where
            argv = c["args"]
            assert argv[:2] == ["hrnet", "launch"], where
            launch_args = cli.build_parser("launch").parse_args(argv[2:])
            assert launch_args.nproc == chips and launch_args.device == "npu", where
            inner = hrnet_commands(c)[1]
            train_args = cli.build_parser(inner[1]).parse_args(inner[2:])
            assert inner[1] == "train" and train_args.device == "npu", where
            env = env_of(c)
            assert "POD_NAME" not in env, f"{where}: POD_NAME switches the TF adapter to a mode that ignores RANK_ID"
            if chips > 1 and "RANK_TABLE_FILE" not in env:
                # The rank table then comes from this pod's annotation, read from a downward-API
                # volume: the pod needs no API access (KFP's steps, which cannot mount one, use
                # the Role's get on pods).
                path = env["ASCEND_ANNOTATIONS_FILE"]["value"]
                mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
                items = volumes[mount["name"]]["downwardAPI"]["items"]
                assert {"path": path[len(mount["mountPath"]) + 1:],
                        "fieldRef": {"fieldPath": "metadata.annotations"}} in items, where
                assert spec["automountServiceAccountToken"] is False, where
    assert {1, 8} <= chips_seen, "a 1-chip and an 8-chip training Job"
    rbac = {key(d): d for d in folder_objects("base")}
    role = rbac[("Role", images.SERVICE_ACCOUNT)]
    assert any(r["apiGroups"] == [""] and r["resources"] == ["pods"] and "get" in r["verbs"] for r in role["rules"])
    binding = rbac[("RoleBinding", images.SERVICE_ACCOUNT)]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": images.SERVICE_ACCOUNT, "namespace": NAMESPACE}]


def test_volcano_job_gets_its_rank_table_from_hccl_controller():
    docs = folder_objects("volcano")
    jobs = [d for d in docs if d["apiVersion"].startswith("batch.volcano.sh/")]
    assert len(jobs) == 1
    job = jobs[0]
    name = job["metadata"]["name"]
    label = {"ring-controller.atlas": "ascend-910"}
    assert label.items() <= job["metadata"]["labels"].items()
    assert job["spec"]["schedulerName"] == "volcano"
    assert job["spec"]["minAvailable"] == sum(t["replicas"] for t in job["spec"]["tasks"]) >= 2
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config["metadata"]["name"] == f"rings-config-{name}"
    assert label.items() <= config["metadata"]["labels"].items()
    assert '"initializing"' in config["data"]["hccl.json"]
    for task in job["spec"]["tasks"]:
        spec = task["template"]["spec"]
        assert label.items() <= task["template"]["metadata"]["labels"].items()
        volumes = {v["name"]: v for v in spec["volumes"]}
        # hccl-controller pairs the Job with its ConfigMap through this volume name.
        assert volumes["ascend-910-config"]["configMap"]["name"] == config["metadata"]["name"]
        c = spec["containers"][0]
        mount = next(m for m in c["volumeMounts"] if m["name"] == "ascend-910-config")
        assert mount["mountPath"] == RANK_TABLE_DIR
        env = env_of(c)
        assert env["RANK_TABLE_FILE"]["value"] == f"{RANK_TABLE_DIR}/hccl.json"
        assert env["XDL_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
        for var in images.OBJECT_STORE_ENV.values():
            assert env[var]["valueFrom"]["secretKeyRef"]["name"] == images.OBJECT_STORE_SECRET
        argv = c["args"]
        nproc = cli.build_parser("launch").parse_args(argv[2:]).nproc
        assert nproc == int(c["resources"]["limits"][ASCEND]) == 8
        train = cli.build_parser("train").parse_args(hrnet_commands(c)[1][2:])
        # Two servers cannot share a ReadWriteOnce volume: data and checkpoints are in the object store.
        assert train.data.startswith("s3://") and train.out.startswith("s3://")


# ----------------------------------------------------------------------------- names, secrets, KFP

def test_names_agree_with_components_images():
    objects = {key(d): d for d in all_objects()}
    assert ("ServiceAccount", images.SERVICE_ACCOUNT) in objects
    assert ("Secret", images.OBJECT_STORE_SECRET) in objects
    assert ("PersistentVolumeClaim", images.DATA_PVC) in objects
    secret = objects[("Secret", images.OBJECT_STORE_SECRET)]
    assert set(secret["stringData"]) == set(images.OBJECT_STORE_ENV)
    for where, template in workloads():
        for c in containers(template):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] == images.OBJECT_STORE_SECRET and "hrnet" in c["image"]:
                    assert images.OBJECT_STORE_ENV[ref["key"]] == e["name"], f"{where}: {e['name']}"


def test_only_its_own_folder_holds_the_secrets_so_a_re_apply_never_resets_them():
    holders = [folder for folder in PLAIN if "Secret" in {d["kind"] for d in folder_objects(folder)}]
    assert holders == ["secrets"]
    for name in OVERLAYS:
        assert "Secret" not in {d["kind"] for d in build(MANIFESTS / "overlays" / name)}, name


# The in-cluster stores: each folder's server Deployment and the port of its S3 API in the pod.
STORES = {"seaweedfs": 8333, "minio": 9000}


@pytest.mark.parametrize("store", STORES)
def test_only_object_store_clients_reach_the_store_and_nobody_its_other_ports(store):
    objects = {key(d): d for d in folder_objects(store)}
    policy = objects[("NetworkPolicy", store)]["spec"]
    server = objects[("Deployment", store)]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= server.items()
    assert objects[("Service", "object-store")]["spec"]["selector"].items() <= server.items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    # The S3 API; MinIO's console, SeaweedFS's master, volume and filer from nobody.
    assert [p["port"] for p in rule["ports"]] == [STORES[store]]
    (container,) = objects[("Deployment", store)]["spec"]["template"]["spec"]["containers"]
    s3_port = next(p for p in container["ports"] if p["name"] == "s3")["containerPort"]
    assert s3_port == STORES[store]
    client = {"hrnet.io/object-store-client": "true"}
    assert {"podSelector": {"matchLabels": client}} in rule["from"]
    # Every workload of ours that talks to the store carries the label, and no other pod is the store.
    for where, template in workloads():
        labels = template["metadata"]["labels"]
        uses_store = any(e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == images.OBJECT_STORE_SECRET
                         for c in containers(template) for e in c.get("env", []))
        if uses_store and labels.get("app.kubernetes.io/name") not in STORES:
            assert client.items() <= labels.items(), where
        if where != store:  # the Deployment itself
            assert not policy["podSelector"]["matchLabels"].items() <= labels.items(), where


def test_secret_template_holds_placeholders_that_minio_refuses(tmp_path):
    secret = next(d for d in all_objects() if key(d) == ("Secret", images.OBJECT_STORE_SECRET))
    assert "data" not in secret
    assert secret["stringData"]["accesskey"] == secret["stringData"]["secretkey"] == "replace-me"
    assert re.fullmatch(r"https?://[a-z0-9.-]+(:\d+)?", secret["stringData"]["endpoint"])
    minio = next(d for d in all_objects() if key(d) == ("Deployment", "minio"))
    guard = minio["spec"]["template"]["spec"]["initContainers"][0]
    assert guard["command"][:2] == ["sh", "-c"]
    script = guard["command"][2]

    def run_guard(user, password):
        return subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "MINIO_ROOT_USER": user, "MINIO_ROOT_PASSWORD": password})

    refused = run_guard("replace-me", "replace-me")
    assert refused.returncode == 1 and "placeholders" in refused.stderr
    assert run_guard("hrnet-admin", "s3cr3t-value-0123").returncode == 0


@pytest.mark.parametrize("store", STORES)
def test_kfp_launcher_points_the_pipeline_root_at_the_bucket(store):
    objects = {key(d): d for d in folder_objects("base") + folder_objects("secrets") + folder_objects(store)}
    launcher = objects[("ConfigMap", "kfp-launcher")]["data"]
    m = re.fullmatch(r"minio://([a-z0-9.-]+)/(.+)", launcher["defaultPipelineRoot"])
    assert m, launcher["defaultPipelineRoot"]
    bucket = m.group(1)
    provider = yaml.safe_load(launcher["providers"])["minio"]["default"]
    ref = provider["credentials"]["secretRef"]
    secret = objects[("Secret", ref["secretName"])]
    assert {ref["accessKeyKey"], ref["secretKeyKey"]} <= set(secret["stringData"])
    assert provider["credentials"]["fromEnv"] is False
    # The endpoint is the store's Service (the same name in both folders), and the store makes this bucket.
    service = objects[("Service", "object-store")]
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "s3")
    assert provider["endpoint"] == f"object-store.{NAMESPACE}.svc.cluster.local:{port}"
    assert secret["stringData"]["endpoint"] == f"http://{provider['endpoint']}"
    if store == "minio":
        job = objects[("Job", "minio-make-bucket")]["spec"]["template"]["spec"]
        make_bucket = next(c for c in job["initContainers"] if "mb" in c["args"])
        assert make_bucket["args"][-1] == f"root/{bucket}"
    else:  # its postStart hook (run for real in test_seaweedfs_manifest.py)
        (container,) = objects[("Deployment", "seaweedfs")]["spec"]["template"]["spec"]["containers"]
        assert f"s3.bucket.create -name {bucket}" in container["lifecycle"]["postStart"]["exec"]["command"][2]


def test_the_seaweedfs_admin_keys_reach_only_its_identities_script():
    objects = {key(d): d for d in folder_objects("secrets") + folder_objects("seaweedfs")}
    assert objects[("Secret", "seaweedfs-admin")]["stringData"] == {"accesskey": "replace-me",
                                                                    "secretkey": "replace-me"}
    for where, template in workloads():
        for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
            refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                    if "secretKeyRef" in e.get("valueFrom", {})}
            if "seaweedfs-admin" in refs:
                assert (where, c["name"]) == ("seaweedfs", "identities")


def test_the_steps_hold_a_user_limited_to_the_bucket_not_minios_root():
    objects = {key(d): d for d in folder_objects("secrets") + folder_objects("minio")}
    root = objects[("Secret", "minio-root")]
    assert root["stringData"] == {"user": "replace-me", "password": "replace-me"}
    # Only MinIO and its set-up Job see the root credentials.
    for where, template in workloads():
        refs = {e["valueFrom"]["secretKeyRef"]["name"] for c in containers(template) for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})}
        if "minio-root" in refs:
            assert where in ("minio", "minio-make-bucket"), where
    # The set-up Job makes the steps' key (hrnet-object-store) a MinIO user with a policy on
    # the bucket alone, and attaches it: mb, policy create, user add, then policy attach.
    job = objects[("Job", "minio-make-bucket")]["spec"]["template"]["spec"]
    steps = [c["args"][2:] for c in job["initContainers"] + job["containers"]]
    assert [s[:3] for s in steps] == [["mb", "--ignore-existing", "root/hrnet"], ["admin", "policy", "create"],
                                      ["admin", "user", "add"], ["admin", "policy", "attach"]]
    env = {e["name"]: e for e in job["containers"][0]["env"]}
    assert env["STEPS_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": images.OBJECT_STORE_SECRET,
                                                                    "key": "accesskey"}
    assert steps[2][3:] == ["root", "$(STEPS_ACCESS_KEY)", "$(STEPS_SECRET_KEY)"]
    assert steps[3][-2:] == ["--user", "$(STEPS_ACCESS_KEY)"] and steps[1][4] == steps[3][4] == "hrnet-bucket"
    policy = json.loads(objects[("ConfigMap", "minio-hrnet-bucket-policy")]["data"]["hrnet-bucket.json"])
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {"arn:aws:s3:::hrnet", "arn:aws:s3:::hrnet/*"}
    assert all(statement["Effect"] == "Allow" and not any(a.startswith("admin:") or a == "s3:*"
                                                          for a in statement["Action"])
               for statement in policy["Statement"])


def test_every_hrnet_command_line_in_the_manifests_parses():
    lines = [(where, argv) for where, template in workloads() for c in containers(template)
             for argv in hrnet_commands(c)]
    assert len(lines) >= 8
    subcommands = set()
    for where, argv in lines:
        assert argv[1] in cli.COMMANDS, f"{where}: unknown command {argv[1]!r}"
        try:
            cli.build_parser(argv[1]).parse_args(argv[2:])
        except SystemExit:
            pytest.fail(f"{where}: `{' '.join(argv)}` does not parse (see the usage above)")
        subcommands.add(argv[1])
    assert {"convert", "launch", "train", "evaluate", "export"} <= subcommands


# ----------------------------------------------------------------------------- lint skips

def test_every_skipped_lint_check_is_listed_with_its_reason():
    listed = (ROOT / "docs" / "skipped-checks.md").read_text()
    rows = {}
    for line in listed.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"[A-Z0-9_, ]+", cells[0]):
            for check in re.split(r",\s*", cells[0]):
                rows.setdefault(check, []).append(cells[2])
    skipped = set(yaml.safe_load((ROOT / ".checkov.yaml").read_text()).get("skip-check", []))
    hadolint = yaml.safe_load((ROOT / ".hadolint.yaml").read_text()) or {}
    skipped |= set(hadolint.get("ignored", []))
    for doc in all_objects():
        for name, value in doc["metadata"].get("annotations", {}).items():
            if name.startswith("checkov.io/skip"):
                skipped.add(value.split("=", 1)[0])
    for path in (ROOT / "images").glob("*/Dockerfile"):
        text = path.read_text()
        skipped |= set(re.findall(r"#\s*checkov:skip=(\w+)", text))
        for codes in re.findall(r"#\s*hadolint ignore=([\w,]+)", text):
            skipped |= set(codes.split(","))
    assert skipped, "the skip collection found nothing: the patterns above are out of date"
    for check in sorted(skipped):
        assert check in rows, f"{check} is skipped but not listed in docs/skipped-checks.md"
        assert all(len(reason) > 40 for reason in rows[check]), f"{check}: give the reason"
