"""images/: the Dockerfiles (hadolint), their pinned requirements against pyproject.toml, the
`make images` names against components/images.py, the Ascend entrypoint, and the compiled
pipeline against all of them: its images, the objects it names and every hrnet command line
its components build must match what the images and manifests provide and the CLI accepts.

The Ascend image carries an older kfp (TF 2.6.5 pins protobuf < 3.20). Whether that kfp runs the
components compiled by the project's kfp is checked with it installed in .venv-kfp-ascend
(`make lint-infra` creates it and sets HRNET_REQUIRE_INFRA_TOOLS=1, so there it cannot skip)."""
import argparse
import ast
import json
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers import tool
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from components import images
from hrnet import cli

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("cpu", "gpu", "ascend")
DOCKERFILES = {t: ROOT / "images" / t / "Dockerfile" for t in TARGETS}
LOCKS = {t: ROOT / "images" / t / "requirements.txt" for t in TARGETS}
KFP_ASCEND_VENV = ROOT / ".venv-kfp-ascend"


def pyproject():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def lock(target: str):
    """{name: version} of an image's requirements file, each pin checked to carry hashes."""
    text = LOCKS[target].read_text()
    pins = {}
    for block in re.split(r"\n(?=\S)", text):
        block = block.strip()
        if not block or block.startswith("#"):
            continue
        m = re.match(r"([A-Za-z0-9._-]+)==([^\s\\;]+)", block)
        assert m, f"{LOCKS[target].relative_to(ROOT)}: not an exact pin: {block.splitlines()[0]}"
        assert "--hash=sha256:" in block, f"{LOCKS[target].relative_to(ROOT)}: {m.group(1)} has no hash"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def dockerfile(target: str) -> str:
    # Continuation lines joined, so each instruction is one line.
    return re.sub(r"\\\n", " ", DOCKERFILES[target].read_text())


def instructions(target: str, keyword: str):
    return [line.split(None, 1)[1] for line in dockerfile(target).splitlines()
            if line.split(None, 1)[:1] == [keyword]]


# ----------------------------------------------------------------------------- Dockerfiles

def test_hadolint_finds_nothing():
    result = subprocess.run([tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), "--format", "json",
                             *map(str, DOCKERFILES.values())], capture_output=True, text=True, timeout=120)
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and not findings, "\n".join(
        f"{f['file']}:{f['line']} {f['code']} {f['message']}" for f in findings) or result.stderr


@pytest.mark.parametrize("target", TARGETS)
def test_dockerfile_installs_the_pinned_set_then_hrnet_and_runs_as_a_user(target):
    text = dockerfile(target)
    runs = " ".join(instructions(target, "RUN"))
    lock_path = f"images/{target}/requirements.txt"
    assert any(lock_path in c for c in instructions(target, "COPY")), f"{target}: copies {lock_path}"
    # Exactly the locked set: hashes required, nothing resolved at build time.
    assert re.search(r"pip install [^&;]*--require-hashes --no-deps -r /tmp/requirements.txt", runs), target
    assert re.search(r"pip install [^&;]*--no-deps --no-build-isolation /src", runs), target
    assert "hrnet" in instructions(target, "COPY")[-1]
    # The KFP launcher writes artifacts under these; a non-root user cannot create them.
    assert re.search(r"mkdir -p /gcs /minio /s3", runs), target
    user = instructions(target, "USER")[-1]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    uid = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], user).split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"{target}: the last USER ({user}) must be a numeric non-root uid"
    assert instructions(target, "HEALTHCHECK") == ["NONE"]
    assert json.loads(instructions(target, "CMD")[-1])[0] == "hrnet"


def test_bases_python_versions_and_tensorflow():
    project = pyproject()["project"]
    extras = {name: [Requirement(r) for r in reqs] for name, reqs in project["optional-dependencies"].items()}
    # The base is a build argument (a registry-free one from images/base/make-base.sh), the
    # public Python image by default.
    assert instructions("cpu", "FROM") == instructions("gpu", "FROM") == ["${BASE_IMAGE}"]
    for target in ("cpu", "gpu"):
        assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", dockerfile(target), re.M), target
    assert instructions("ascend", "FROM") == ["${CANN_BASE}"]
    assert re.search(r"^ARG PYTHON=python3\.9$", dockerfile("ascend"), re.M)
    for target, extra in (("cpu", "cpu"), ("gpu", "gpu")):
        (tf,) = extras[extra]
        assert lock(target)[canonicalize_name(tf.name)] == str(tf.specifier).lstrip("="), target
    assert any(name.startswith("nvidia-cudnn") for name in lock("gpu")), "tensorflow[and-cuda] brings cuDNN"
    assert lock("ascend")["tensorflow"] == "2.6.5"  # what the CANN TF adapter is built against
    assert Version(lock("ascend")["protobuf"]) < Version("3.20"), "TF 2.6.5's protobuf range"


@pytest.mark.parametrize("target", TARGETS)
def test_lock_satisfies_hrnet_and_carries_kfp(target):
    project = pyproject()["project"]
    pins = lock(target)
    # k8s: the rank table; demo: `hrnet demo-data` (scikit-learn's digits) works in every image.
    needed = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["k8s"]
              + project["optional-dependencies"]["demo"]]
    if target != "ascend":  # kfp's compiler, and KServe's server for `hrnet serve` (Python 3.10+)
        needed += [Requirement(r) for r in project["optional-dependencies"]["kfp"]
                   + project["optional-dependencies"]["serve"]]
    for req in needed:
        name = canonicalize_name(req.name)
        assert name in pins, f"images/{target}/requirements.txt lacks {req.name}: re-run images/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{target}: {name}=={pins[name]} does not meet {req}: re-run images/lock.sh"
    # The KFP executor (python3 -m kfp.dsl.executor_main) runs from the image: no pip at start.
    assert "kfp" in pins and "kfp-pipeline-spec" in pins


# ----------------------------------------------------------------------------- make images

def make_images(*args):
    return subprocess.run(["make", "--no-print-directory", "images", "CONTAINER_TOOL=echo", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def built_tags(stdout: str):
    # CONTAINER_TOOL=echo prints each build's arguments instead of building.
    lines = [line for line in stdout.splitlines() if line.startswith("build ")]
    found = {}
    for line in lines:
        argv = line.split()
        dockerfile_arg = Path(argv[argv.index("-f") + 1])
        assert (ROOT / dockerfile_arg).is_file() and argv[-1] == "."
        found[dockerfile_arg.parent.name] = argv[argv.index("-t") + 1]
    return found


def test_make_images_builds_the_names_the_pipeline_uses():
    result = make_images("CANN_BASE=registry.example/ascend-toolkit:8.0-py39")
    assert result.returncode == 0, result.stderr
    assert built_tags(result.stdout) == images.IMAGES
    assert "--build-arg CANN_BASE=registry.example/ascend-toolkit:8.0-py39" in result.stdout
    result = make_images("REGISTRY=registry.example/team", "TAG=1.2.3", "IMAGE_TARGETS=cpu gpu")
    assert result.returncode == 0, result.stderr
    expected = {t: images.image_for(t, "registry.example/team", "1.2.3") for t in ("cpu", "gpu")}
    assert built_tags(result.stdout) == expected


def test_make_images_refuses_ascend_without_a_cann_base():
    result = make_images("IMAGE_TARGETS=ascend")
    assert result.returncode != 0 and "CANN_BASE" in result.stderr
    assert "build " not in result.stdout


# ----------------------------------------------------------------------------- Ascend entrypoint

def test_ascend_entrypoint_sources_the_cann_environment_once(tmp_path):
    count = tmp_path / "sourced"
    set_env = tmp_path / "set_env.sh"
    set_env.write_text(f'echo x >> "{count}"\nexport ASCEND_TOOLKIT_HOME=/opt/cann\n'
                       'export LD_LIBRARY_PATH=/opt/cann/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\n')
    entry = str(ROOT / "images" / "ascend" / "entrypoint.sh")
    env = {"PATH": "/usr/bin:/bin", "ASCEND_SET_ENV_FILES": f"{tmp_path}/missing.sh:{set_env}"}
    printenv = ["sh", "-c", 'echo "$ASCEND_TOOLKIT_HOME|$LD_LIBRARY_PATH|$HRNET_ASCEND_ENV"']
    out = subprocess.run(["bash", entry, *printenv], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "/opt/cann|/opt/cann/lib64|1"
    # A nested call (the image's python3 inside a step) does not source it again.
    nested = subprocess.run(["bash", entry, "bash", entry, "true"], env=env, capture_output=True, text=True)
    assert nested.returncode == 0 and count.read_text().count("x") == 2
    none = subprocess.run(["bash", entry, "true"], env=dict(env, ASCEND_SET_ENV_FILES=f"{tmp_path}/missing.sh"),
                          capture_output=True, text=True)
    assert none.returncode == 0 and "none of the CANN set_env.sh files exists" in none.stderr


# ----------------------------------------------------------------------------- the compiled pipeline

@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from pipelines.__main__ import compile_pipeline

    out = {}
    for target in TARGETS:
        path = tmp_path_factory.mktemp("ir") / f"hrnet-{target}.yaml"
        compile_pipeline(target, str(path))
        docs = list(yaml.safe_load_all(path.read_text()))
        out[target] = (docs[0], docs[1] if len(docs) > 1 else {})
    return out


def component_sources(ir):
    """(executor name, function name, source) of every Python component in the IR."""
    for name, executor in ir["deploymentSpec"]["executors"].items():
        container = executor.get("container")
        if not container:
            continue  # the importer
        args = container["args"]
        yield name, args[args.index("--function_to_execute") + 1], container["command"][-1], container


@pytest.mark.parametrize("target", TARGETS)
def test_pipeline_runs_in_the_target_image_without_installing_anything(compiled, target):
    ir, _ = compiled[target]
    seen = 0
    for name, _, _, container in component_sources(ir):
        assert container["image"] == images.IMAGES[target], f"{target}/{name}"
        script = container["command"][2]
        assert "python3 -m kfp.dsl.executor_main" in script, f"{target}/{name}"
        assert "pip install" not in script, f"{target}/{name}: install_kfp_package=False, the image has kfp"
        seen += 1
    assert seen >= 5


def manifest_objects():
    folders = [ROOT / "manifests" / f for f in ("base", "secrets", "minio", "ascend-jobs", "volcano")]
    docs = [d for f in folders for p in sorted(f.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.mark.parametrize("target", TARGETS)
def test_pipeline_names_objects_the_manifests_create(compiled, target):
    _, platform = compiled[target]
    objects = manifest_objects()
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    secrets = pvcs = 0
    for name, spec in executors.items():
        for ref in spec.get("secretAsEnv", []):
            secret = objects.get(("Secret", ref["secretName"]))
            assert secret, f"{target}/{name}: no Secret {ref['secretName']} in manifests/"
            assert {k["secretKey"] for k in ref["keyToEnv"]} <= set(secret["stringData"]), f"{target}/{name}"
            secrets += 1
        for mount in spec.get("pvcMount", []):
            assert ("PersistentVolumeClaim", mount["constant"]) in objects, f"{target}/{name}: {mount}"
            pvcs += 1
        for label, value in spec.get("nodeSelector", {}).get("labels", {}).items():
            # The node selector the Jobs of manifests/ use for the same chips.
            assert (label, value) == ("accelerator", "huawei-Ascend910"), f"{target}/{name}"
    assert secrets >= 4 and pvcs >= 1


def sample_value(action: argparse.Action) -> list:
    """Command-line words that ``action`` accepts (to parse a flag whose value is only known at run time)."""
    if action.nargs == 0:
        return []
    value = action.choices[0] if action.choices else {int: "1", float: "1.0"}.get(action.type, "x")
    count = action.nargs if isinstance(action.nargs, int) else 1
    return [str(value)] * count


def command_lines(source: str):
    """The hrnet command lines a component body builds: a list literal ["hrnet", <command>, ...] plus
    every "--flag" string of the same function (flags added to it at run time)."""
    found = []
    for func in [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)]:
        strings = [n.value for n in ast.walk(func) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        flags = [s for s in strings if re.fullmatch(r"--[a-z][a-z0-9-]*", s)]
        for node in ast.walk(func):
            if (isinstance(node, ast.List) and len(node.elts) >= 2
                    and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts[:2])
                    and node.elts[0].value == "hrnet"):
                found.append((node.elts[1].value, flags))
    return found


def test_every_hrnet_command_line_the_pipeline_builds_parses(compiled):
    checked = set()
    for target in TARGETS:
        ir, _ = compiled[target]
        for name, _, source, _ in component_sources(ir):
            for command, flags in command_lines(source):
                assert command in cli.COMMANDS, f"{target}/{name}: unknown command hrnet {command}"
                parser = cli.build_parser(command)
                options = parser._option_string_actions
                unknown = [f for f in flags if f not in options]
                assert not unknown, f"{target}/{name}: hrnet {command} has no option {', '.join(unknown)}"
                argv = [word for flag in flags for word in [flag, *sample_value(options[flag])]]
                try:
                    parser.parse_args(argv)
                except SystemExit:
                    pytest.fail(f"{target}/{name}: `hrnet {command} {' '.join(argv)}` does not parse")
                checked.add(command)
    # The train step's command line is built by the library from the pipeline's parameters.
    from hrnet.train.pipeline_args import train_command

    argv = train_command("/data/records", "/data/run", dict(
        model="w18", device="npu", batch_size=32, image_size=224, epochs=100.0, train_steps=5000, lr=0.0125,
        precision="mixed_fp16", seed=7, schedule="cosine", warmup_epochs=1.0, flip=False))
    assert argv[:2] == ["hrnet", "train"] and "--lr" in argv and "--train-steps" in argv
    args = cli.build_parser("train").parse_args(argv[2:])
    assert (args.model, args.train_steps, args.schedule, args.flip) == ("w18", 5000, "cosine", False)


def test_ascend_components_are_python_3_9(compiled, tmp_path):
    # The Ascend image runs them on its Python 3.9, the rest of the project's code is checked by `make lint`.
    ir, _ = compiled["ascend"]
    files = []
    for name, _, source, _ in component_sources(ir):
        files.append(tmp_path / f"{name}.py")
        files[-1].write_text(source)
    result = subprocess.run([tool("vermin"), "-q", "--no-tips", "--violations", "-t=3.9-", *map(str, files)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and files, result.stdout + result.stderr


# ----------------------------------------------------------------------------- kfp in the Ascend image

def kfp_ascend_python():
    python = os.environ.get("HRNET_KFP_ASCEND_PYTHON") or str(KFP_ASCEND_VENV / "bin" / "python")
    if not Path(python).exists():
        if os.environ.get("HRNET_REQUIRE_INFRA_TOOLS"):
            pytest.fail(f"{python} is missing: `make lint-infra` creates it")
        pytest.skip("no .venv-kfp-ascend (make lint-infra creates it and runs this test)")
    return python


# Runs in the Ascend image's kfp: each component's real signature goes through that kfp's
# executor (argument marshalling, artifacts, outputs), with the body replaced by a stub that
# records what it was given (the body would import hrnet and TensorFlow).
EXECUTOR_DRIVER = textwrap.dedent('''
    import ast, json, sys
    import kfp
    from kfp.dsl import executor
    jobs = json.load(open(sys.argv[1]))
    results = {}
    for job in jobs:
        tree = ast.parse(job["source"])
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == job["function"]:
                node.body = ast.parse(
                    "CALLS.append({k: (type(v).__name__, getattr(v, 'path', None)) for k, v in locals().items()})\\n"
                    "return RETURN").body
        scope = {"CALLS": [], "RETURN": tuple(job["return"]) if isinstance(job["return"], list) else job["return"]}
        exec(compile(tree, "ephemeral_component.py", "exec"), scope)
        executor.Executor(executor_input=job["executor_input"], function_to_execute=scope[job["function"]]).execute()
        results[job["name"]] = scope["CALLS"]
    print(json.dumps({"kfp": kfp.__version__, "results": results}))
''')


def executor_input(ir, component: str, root: Path):
    spec = ir["components"][component]
    samples = {"STRING": "x", "NUMBER_INTEGER": 1, "NUMBER_DOUBLE": 0.5, "BOOLEAN": True, "STRUCT": {"k": 1},
               "TASK_FINAL_STATUS": {"state": "FAILED", "pipelineJobResourceName": "run-1",
                                     "pipelineTaskName": "hrnet-run", "error": {"code": 2, "message": "x"}}}

    def artifacts(kind):
        out = {}
        for name, a in spec.get(kind, {}).get("artifacts", {}).items():
            uri = str(root / "artifacts" / component / name)  # a local URI is its own path
            out[name] = {"artifacts": [{"name": name, "type": a["artifactType"], "uri": uri, "metadata": {}}]}
        return out

    params = spec.get("inputDefinitions", {}).get("parameters", {})
    outputs = {"artifacts": artifacts("outputDefinitions"), "outputFile": str(root / f"{component}.json")}
    out_params = spec.get("outputDefinitions", {}).get("parameters", {})
    if out_params:
        outputs["parameters"] = {n: {"outputFile": str(root / f"{component}-{n}")} for n in out_params}
    return {"inputs": {"parameterValues": {n: samples[p["parameterType"]] for n, p in params.items()},
                       "artifacts": artifacts("inputDefinitions")},
            "outputs": outputs}


def test_ascend_image_kfp_runs_the_components_compiled_by_the_project_kfp(compiled, tmp_path):
    python = kfp_ascend_python()
    ir, _ = compiled["ascend"]
    jobs = []
    for name, function, source, _ in component_sources(ir):
        component = next(c for c, spec in ir["components"].items() if spec.get("executorLabel") == name)
        returns = ir["components"][component].get("outputDefinitions", {}).get("parameters", {})
        # validate's (config,), a NamedTuple of a struct; deploy's URL, a string (KFP's "Output")
        samples = {"config": {"batch_size": 8}, "Output": "http://hrnet.hrnet.example.com"}
        returned = {n: samples[n] for n in returns} or None
        jobs.append({"name": name, "component": component, "function": function, "source": source,
                     "return": returned and (returned["Output"] if "Output" in returned else list(returned.values())),
                     "expected": returned,
                     "executor_input": executor_input(ir, component, tmp_path)})
    assert len(jobs) >= 5
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "driver.py").write_text(EXECUTOR_DRIVER)
    result = subprocess.run([python, str(tmp_path / "driver.py"), str(tmp_path / "jobs.json")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["kfp"] == lock("ascend")["kfp"], "the venv must hold the Ascend image's kfp"
    python_types = {"STRING": "str", "NUMBER_INTEGER": "int", "NUMBER_DOUBLE": "float", "BOOLEAN": "bool",
                    "STRUCT": "dict", "TASK_FINAL_STATUS": "PipelineTaskFinalStatus"}
    for job in jobs:
        (call,) = report["results"][job["name"]]
        spec = ir["components"][job["component"]]
        expected = {n: (python_types[p["parameterType"]], None)
                    for n, p in spec["inputDefinitions"].get("parameters", {}).items()}
        for kind in ("inputDefinitions", "outputDefinitions"):
            for n, a in spec.get(kind, {}).get("artifacts", {}).items():
                expected[n] = (a["artifactType"]["schemaTitle"].split(".")[-1],
                               str(tmp_path / "artifacts" / job["component"] / n))
        assert {n: tuple(v) for n, v in call.items()} == expected, job["name"]
        if job["return"]:
            output = json.loads((tmp_path / f"{job['component']}.json").read_text())
            assert output["parameterValues"] == job["expected"], job["name"]
