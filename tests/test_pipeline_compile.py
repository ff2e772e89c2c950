"""The compiled pipeline (IR YAML) of every target: what each step asks of Kubernetes."""
import os
import re
import subprocess
import sys

import pytest
import yaml

from components import images
from pipelines.__main__ import compile_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("validate", "prepare-data", "train", "evaluate", "export", "record-run")
STORAGE_STEPS = ("prepare-data", "train", "evaluate", "export")


def compile_ir(tmp_path, target, **kwargs):
    path = str(tmp_path / f"hrnet-{target}.yaml")
    compile_pipeline(target, path, **kwargs)
    with open(path) as f:
        text = f.read()
    ir, platform = yaml.safe_load_all(text)
    return ir, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"], text


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ir")
    return {target: compile_ir(tmp, target) for target in images.TARGETS}


def executors_of(ir, step):
    """Executor labels of every use of component ``step`` (evaluate, export and deploy appear once per train branch)."""
    found = [spec["executorLabel"] for name, spec in ir["components"].items()
             if re.fullmatch(f"comp-{step}(-\\d+)?", name) and "executorLabel" in spec]
    assert found, f"no executor for step {step}"
    return found


def container(ir, label):
    return ir["deploymentSpec"]["executors"][label]["container"]


def trace_to_root(ir, component, param):
    """Follow a component input up through the DAGs; returns ('root', name), ('constant', value)
    or ('task', producer, output)."""
    callers = [(parent, task) for parent, spec in list(ir["components"].items()) + [("root", ir["root"])]
               for task in spec.get("dag", {}).get("tasks", {}).values()
               if task["componentRef"]["name"] == component]
    assert callers, f"nothing calls {component}"
    ends = set()
    for parent, task in callers:
        source = task["inputs"]["parameters"][param]
        if "runtimeValue" in source:
            ends.add(("constant", source["runtimeValue"]["constant"]))
        elif "taskOutputParameter" in source:
            output = source["taskOutputParameter"]
            ends.add(("task", output["producerTask"], output["outputParameterKey"]))
        elif parent == "root":
            ends.add(("root", source["componentInputParameter"]))
        else:
            ends |= trace_to_root(ir, parent, source["componentInputParameter"])
    return ends


def test_ascend_chip_count_follows_the_devices_parameter(compiled):
    ir, _, _ = compiled["ascend"]
    for label in executors_of(ir, "train"):
        accelerator = container(ir, label)["resources"]["accelerator"]
        assert accelerator["resourceType"] == "huawei.com/Ascend910"
        placeholder = re.fullmatch(r"\{\{\$\.inputs\.parameters\['(.+)'\]\}\}", accelerator["resourceCount"])
        assert placeholder, accelerator
        component = next(n for n, c in ir["components"].items() if c.get("executorLabel") == label)
        assert trace_to_root(ir, component, placeholder.group(1)) == {("root", "devices")}
    # The same parameter reaches the launcher as its process count.
    for component in ("comp-train",):
        assert trace_to_root(ir, component, "devices") == {("root", "devices")}
        # and its --device comes with the config the validate step checked, given the target's.
        assert trace_to_root(ir, component, "config") == {("task", "validate", "config")}
    assert trace_to_root(ir, "comp-validate", "device") == {("constant", "npu")}


def test_ascend_train_pod_lands_on_a_chip_node(compiled):
    ir, k8s, _ = compiled["ascend"]
    for label in executors_of(ir, "train"):
        assert k8s[label]["nodeSelector"]["labels"] == {"accelerator": "huawei-Ascend910"}
        toleration = {"key": "huawei.com/Ascend910", "operator": "Exists", "effect": "NoSchedule"}
        assert toleration in k8s[label]["tolerations"]
        shm = [m for m in k8s[label]["emptyDirMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm and shm[0]["medium"] == "Memory"
        resources = container(ir, label)["resources"]
        assert resources["resourceCpuRequest"] and resources["resourceMemoryRequest"]
    # Only training needs the chips: the other steps may run on any node.
    for step in ("validate", "prepare-data", "evaluate", "export", "record-run"):
        for label in executors_of(ir, step):
            assert "accelerator" not in container(ir, label).get("resources", {})
            assert "nodeSelector" not in k8s.get(label, {}) and "tolerations" not in k8s.get(label, {})


@pytest.mark.parametrize("train_devices, cpu, memory", [(None, "16", "64G"), (1, "2", "8G")])
def test_the_train_pod_is_sized_for_the_devices_it_was_compiled_for(tmp_path, train_devices, cpu, memory):
    """8 chips by default (what an Ascend server has); `--train-devices 1` fits a small cluster,
    and its validate step then refuses a run that asks for more (check_pipeline_parameters)."""
    kwargs = {} if train_devices is None else {"train_devices": train_devices}
    ir, _, _ = compile_ir(tmp_path, "ascend", **kwargs)
    for label in executors_of(ir, "train"):
        resources = container(ir, label)["resources"]
        assert (resources["cpuRequest"], resources["resourceMemoryRequest"]) == (float(cpu), memory)
    assert trace_to_root(ir, "comp-validate", "train_devices") == {("constant", train_devices or 8)}


def test_a_run_asking_more_devices_than_the_train_pod_was_compiled_for_is_refused(tmp_path, capsys):
    from hrnet.train.pipeline_args import check_pipeline_parameters
    from pipelines import parameters
    from pipelines.__main__ import main

    run = {p.name: p.default for p in parameters.PARAMETERS}
    run.update(data_uri="s3://bucket/images", devices=4)
    with pytest.raises(ValueError, match=r"devices=4, but this pipeline's train pod was compiled with CPU and "
                                         r"memory for 2: compile it again .*--train-devices 4"):
        check_pipeline_parameters(**parameters.validate_arguments(run, "npu", 2))
    check_pipeline_parameters(**parameters.validate_arguments(dict(run, nodes=2), "npu", 2))  # job pods: per run
    assert main(["compile", "--target", "cpu", "--train-devices", "3", "-o", str(tmp_path / "x.yaml")]) == 2
    assert "--train-devices: " in capsys.readouterr().err and not (tmp_path / "x.yaml").exists()


def test_gpu_train_requests_gpus(compiled):
    ir, k8s, _ = compiled["gpu"]
    for label in executors_of(ir, "train"):
        accelerator = container(ir, label)["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu"
        assert "pipelinechannel--devices" in accelerator["resourceCount"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s[label]["tolerations"]
        assert any(m["mountPath"] == "/dev/shm" for m in k8s[label]["emptyDirMounts"])
        assert "nodeSelector" not in k8s[label]
    assert trace_to_root(ir, "comp-validate", "device") == {("constant", "gpu")}


def test_cpu_train_asks_for_cpu_and_memory_only(compiled):
    ir, k8s, _ = compiled["cpu"]
    for label in executors_of(ir, "train"):
        resources = container(ir, label)["resources"]
        assert "accelerator" not in resources
        assert float(resources["cpuRequest"]) >= 1 and resources["resourceMemoryRequest"].endswith("G")
        assert "tolerations" not in k8s[label] and "nodeSelector" not in k8s[label]
    assert trace_to_root(ir, "comp-validate", "device") == {("constant", "cpu")}


@pytest.mark.parametrize("target", images.TARGETS)
def test_the_train_pods_cache_volume_holds_the_default_data_cache(compiled, target):
    from hrnet.train.config import TrainConfig

    ir, k8s, _ = compiled[target]
    default = TrainConfig.__dataclass_fields__["data_cache_gb"].default
    for label in executors_of(ir, "train"):
        cache = [m for m in k8s[label]["emptyDirMounts"] if m["mountPath"] == images.CACHE_DIR]
        assert cache and float(cache[0]["sizeLimit"].rstrip("G")) >= default + 5  # and room for the run's files
        env = {e["name"]: e["value"] for e in container(ir, label).get("env", [])}
        assert env["HRNET_CACHE_DIR"] == images.CACHE_DIR


@pytest.mark.parametrize("target", images.TARGETS)
def test_every_step_states_requests_and_limits(compiled, target):
    ir, _, _ = compiled[target]
    for step in STEPS:
        for label in executors_of(ir, step):
            resources = container(ir, label)["resources"]
            assert resources["cpuRequest"] <= resources["cpuLimit"], (step, resources)
            assert resources["memoryRequest"] <= resources["memoryLimit"], (step, resources)
    # prepare-data decodes every image and evaluate runs the model: more than the bookkeeping steps.
    for step in ("prepare-data", "evaluate"):
        for label in executors_of(ir, step):
            assert container(ir, label)["resources"]["cpuRequest"] >= 2


@pytest.mark.parametrize("target", images.TARGETS)
def test_every_step_runs_as_the_images_non_root_user(compiled, target):
    ir, k8s, _ = compiled[target]
    labels = list(ir["deploymentSpec"]["executors"])
    assert len(labels) >= 6
    for label in labels:
        assert k8s[label]["securityContext"] == {"runAsUser": str(images.RUN_AS_USER), "runAsNonRoot": True}, label
        name, value = images.OBJECT_STORE_CLIENT_LABEL
        assert k8s[label]["podMetadata"]["labels"][name] == value, label  # the stores' NetworkPolicy


@pytest.mark.parametrize("target", images.TARGETS)
def test_object_store_credentials_come_from_the_secret(compiled, target):
    ir, k8s, _ = compiled[target]
    for step in STORAGE_STEPS:
        for label in executors_of(ir, step):
            (secret,) = k8s[label]["secretAsEnv"]
            assert secret["secretName"] == images.OBJECT_STORE_SECRET
            assert {e["secretKey"]: e["envVar"] for e in secret["keyToEnv"]} == images.OBJECT_STORE_ENV
    for step in ("validate", "record-run"):
        for label in executors_of(ir, step):
            assert "secretAsEnv" not in k8s.get(label, {})
    # Credentials are never pipeline parameters.
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert not [p for p in params if re.search("key|secret|password|token|credential", p, re.I)]


def test_no_credential_value_in_any_yaml(tmp_path, monkeypatch):
    canaries = {"AWS_ACCESS_KEY_ID": "AKIACANARYACCESS1234", "AWS_SECRET_ACCESS_KEY": "canary/secret+Value9876",
                "S3_ENDPOINT": "http://canary-endpoint.internal:9000", "MINIO_SECRET_KEY": "canary-minio-secret"}
    for name, value in canaries.items():
        monkeypatch.setenv(name, value)
    for target in images.TARGETS:
        _, _, text = compile_ir(tmp_path, target)
        for value in canaries.values():
            assert value not in text
        assert "canary" not in text.lower()


@pytest.mark.parametrize("target", images.TARGETS)
def test_every_step_runs_the_targets_image_without_pip(compiled, target):
    ir, _, _ = compiled[target]
    executors = ir["deploymentSpec"]["executors"]
    used = {e["container"]["image"] for e in executors.values() if "container" in e}
    assert used == {images.image_for(target)} == {images.IMAGES[target]}
    for e in executors.values():
        if "container" in e:
            script = " ".join(e["container"]["command"])
            # install_kfp_package=False: the images bring kfp; nothing is installed at start.
            assert "pip install" not in script
            assert "from hrnet" in script


def test_image_registry_and_tag_are_set_when_compiling(tmp_path, monkeypatch):
    monkeypatch.setenv("HRNET_IMAGE_REGISTRY", "registry.example.com/ml")
    monkeypatch.setenv("HRNET_IMAGE_TAG", "2024.06")
    ir, _, _ = compile_ir(tmp_path, "ascend")
    assert {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values() if "container" in e} == {
        "registry.example.com/ml/hrnet-ascend:2024.06"}
    ir, _, _ = compile_ir(tmp_path, "gpu", image="mirror.local/hrnet:dev")
    assert {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values() if "container" in e} == {
        "mirror.local/hrnet:dev"}


def test_train_retries_and_the_exit_handler_records_the_run(compiled):
    ir, _, _ = compiled["ascend"]
    # The one-server train step and the multi-node launcher.
    retried = [(name, spec["dag"]["tasks"][task]) for name, spec in ir["components"].items()
               for task in ("train", "train-job") if task in spec.get("dag", {}).get("tasks", {})]
    assert sorted(t["taskInfo"]["name"] for _, t in retried) == ["train", "train"]  # the launcher is shown as train
    for _, task in retried:
        policy = task["retryPolicy"]
        assert policy["maxRetryCount"] >= 1
        # A retry starts only once the killed pod's lease on its output has expired.
        from hrnet.storage import LEASE_TTL

        assert float(policy["backoffDuration"].rstrip("s")) > LEASE_TTL
    root_tasks = ir["root"]["dag"]["tasks"]
    record = root_tasks["record-run"]
    assert record["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert record["inputs"]["parameters"]["status"]["taskFinalStatus"]["producerTask"] == "exit-handler-1"
    # Everything else runs inside the exit handler, so any failure is recorded.
    assert set(root_tasks) == {"exit-handler-1", "record-run"}


def dag_depth(ir, component="root") -> int:
    """How many DAGs deep the deepest step sits below the root's DAG."""
    spec = ir["root"] if component == "root" else ir["components"][component]
    inner = [dag_depth(ir, t["componentRef"]["name"]) for t in spec["dag"]["tasks"].values()
             if "dag" in ir["components"][t["componentRef"]["name"]]]
    return 1 + max(inner) if inner else 0


@pytest.mark.parametrize("target", images.TARGETS)
def test_the_run_graph_is_at_most_three_levels_deep_with_names_a_user_knows(compiled, target):
    """The exit handler (hrnet-run), the train branches, a branch: no sub-pipelines and no
    condition around deploy, and every step under its own name in both train branches."""
    ir, _, _ = compiled[target]
    assert dag_depth(ir) == 3
    shown = sorted({t["taskInfo"]["name"] for spec in list(ir["components"].values()) + [ir["root"]]
                    for t in spec.get("dag", {}).get("tasks", {}).values()})
    assert shown == ["condition-branches-2", "deploy", "evaluate", "export", "hrnet-run", "one-server", "prepare-data",
                     "record-run", "several-servers", "train", "validate"]


def test_validate_runs_first_then_one_step_prepares_the_data(compiled):
    ir, _, _ = compiled["cpu"]
    handler = ir["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert handler["validate"].get("dependentTasks") is None
    assert handler["prepare-data"]["dependentTasks"] == ["validate"]
    assert trace_to_root(ir, "comp-prepare-data", "data_uri") == {("root", "data_uri")}
    # The train branches take its one Dataset (no importer: it would download the whole data
    # set into every pod that takes it).
    branches = [name for name in handler if name.startswith("condition-branches")]
    assert len(branches) == 1 and handler[branches[0]]["dependentTasks"] == ["prepare-data", "validate"]


def test_run_time_parameters(compiled):
    ir, _, _ = compiled["ascend"]
    params = ir["root"]["inputDefinitions"]["parameters"]
    expected = {"data_uri": "STRING", "model": "STRING", "devices": "NUMBER_INTEGER",
                "epochs": "NUMBER_DOUBLE", "train_steps": "NUMBER_INTEGER", "batch_size": "NUMBER_INTEGER",
                "lr": "NUMBER_DOUBLE", "precision": "STRING", "image_size": "NUMBER_INTEGER",
                "seed": "NUMBER_INTEGER", "train_config": "STRUCT", "checkpoint_uri": "STRING", "init_from": "STRING",
                "export_onnx": "BOOLEAN", "datasets_uri": "STRING",
                "nodes": "NUMBER_INTEGER", "job_timeout": "NUMBER_DOUBLE", "deploy": "BOOLEAN",
                "deploy_name": "STRING", "serving_runtime": "STRING"}
    assert {name: p["parameterType"] for name, p in params.items()} == expected
    assert params["devices"]["defaultValue"] == 1 and params["model"]["defaultValue"] == "w18"
    assert params["nodes"]["defaultValue"] == 1
    assert params["deploy"]["defaultValue"] is False  # serving is asked for, never a surprise


def test_the_run_form_describes_every_parameter(compiled):
    """The pipeline's Args: docstring becomes each input's description in the UI's run form."""
    from hrnet import configs

    ir, _, _ = compiled["ascend"]
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert not [name for name, p in params.items() if len(p.get("description", "")) < 20]
    named = re.findall(r"\bw\d\d(?:_small_v\d)?\b", params["model"]["description"])
    assert named == configs.available()


def test_the_three_ways_to_compile_agree(tmp_path):
    """``python -m pipelines compile`` and ``kfp dsl compile --py`` give the same IR. KFP's
    CLI puts only the file's folder on the path: the checkout's root comes from PYTHONPATH,
    as docs/cluster.md says (components/ and pipelines/ are not installed)."""
    env = dict(os.environ, HRNET_TARGET="gpu", PYTHONPATH=ROOT)
    ours, theirs = tmp_path / "ours.yaml", tmp_path / "kfp.yaml"
    subprocess.run([sys.executable, "-m", "pipelines", "compile", "--target", "gpu", "-o", str(ours)],
                   cwd=ROOT, check=True, env=env)
    kfp_cli = os.path.join(os.path.dirname(sys.executable), "kfp")
    subprocess.run([kfp_cli, "dsl", "compile", "--py", os.path.join(ROOT, "pipelines", "hrnet_pipeline.py"),
                    "--output", str(theirs)], cwd=str(tmp_path), check=True, env=env)
    _, _, in_process = compile_ir(tmp_path, "gpu")
    assert ours.read_text() == theirs.read_text() == in_process


def test_unknown_target_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        compile_pipeline("tpu", str(tmp_path / "x.yaml"))


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, capsys):
    """-o on a read-only file system (sysfs refuses new files even to root) or under a file
    was a PermissionError traceback."""
    from pipelines.__main__ import main

    (tmp_path / "a-file").write_text("x")
    for output in ("/sys/hrnet.yaml", str(tmp_path / "a-file" / "hrnet.yaml")):
        assert main(["compile", "--target", "cpu", "-o", output]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and output in lines[0] and "Traceback" not in err, err


@pytest.mark.parametrize("target", images.TARGETS)
def test_the_multi_node_launcher_asks_for_no_accelerator_and_is_named_after_the_run(compiled, target):
    ir, _, _ = compiled[target]
    labels = executors_of(ir, "train-job")
    assert len(labels) == 1
    for label in labels:
        resources = container(ir, label)["resources"]
        assert "accelerator" not in resources
        assert resources["cpuLimit"] <= 2 and resources["memoryLimit"] <= 2
    component = "comp-train-job"
    assert trace_to_root(ir, component, "nodes") == {("root", "nodes")}
    assert trace_to_root(ir, component, "devices") == {("root", "devices")}
    assert trace_to_root(ir, component, "target") == {("constant", target)}
    assert trace_to_root(ir, component, "job_name") == {("constant", "{{$.pipeline_job_uuid}}")}
    # The branches are chosen by nodes: one train pod for 1, the launcher for more.
    conditions = {t["triggerPolicy"]["condition"] for spec in ir["components"].values()
                  for t in spec.get("dag", {}).get("tasks", {}).values() if "nodes" in t.get("triggerPolicy", {})
                  .get("condition", "")}
    assert conditions == {"int(inputs.parameter_values['pipelinechannel--nodes']) == 1",
                          "!(int(inputs.parameter_values['pipelinechannel--nodes']) == 1)"}


@pytest.mark.parametrize("target", images.TARGETS)
def test_deploy_runs_when_asked_once_evaluated_in_an_image_that_holds_kserve(compiled, target):
    ir, _, _ = compiled[target]
    deploys = [t for spec in ir["components"].values() for t in spec.get("dag", {}).get("tasks", {}).values()
               if t["componentRef"]["name"].startswith("comp-deploy")]
    assert len(deploys) == 2  # one or several servers
    for task in deploys:
        # A step that serves only when asked (deploy=true), after the weights were evaluated.
        assert "triggerPolicy" not in task
        assert sorted(task["dependentTasks"]) == sorted(t for t in task["dependentTasks"]
                                                        if t.startswith(("evaluate", "export")))
        assert len(task["dependentTasks"]) == 2
        # Python 3.9 in the Ascend image cannot hold KServe's server: the cpu image serves.
        serving = images.image_for("cpu" if target == "ascend" else target)
        assert task["inputs"]["parameters"]["image"] == {"runtimeValue": {"constant": serving}}
    assert trace_to_root(ir, "comp-deploy", "name") == {("root", "deploy_name")}
    assert trace_to_root(ir, "comp-deploy", "enabled") == {("root", "deploy")}


def test_deploy_not_asked_for_touches_nothing():
    from components.deploy import deploy

    # The component's own function, as its pod runs it, with no Kubernetes API anywhere near.
    assert deploy.python_func(exported=None, enabled=False, name="hrnet", runtime="tensorflow", image="x",
                              timeout=1.0) == ""


def test_an_ascend_pipeline_with_its_own_image_still_serves_from_the_cpu_image(tmp_path):
    ir, _, _ = compile_ir(tmp_path, "ascend", image="registry.example/hrnet-ascend:custom")
    (image,) = {t["inputs"]["parameters"]["image"]["runtimeValue"]["constant"]
                for spec in ir["components"].values() for t in spec.get("dag", {}).get("tasks", {}).values()
                if t["componentRef"]["name"].startswith("comp-deploy")}
    assert image == images.image_for("cpu")
