"""``python -m pipelines submit`` through kfp.Client, against a small stand-in for the KFP v2 REST API."""
import importlib.metadata
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from components import images
from pipelines.__main__ import UsageError, main, parse_arguments

# A backend of the kfp-kubernetes release that compiles the pipeline knows all it uses.
COMPILER = importlib.metadata.version("kfp-kubernetes")


class FakeKfpApi(BaseHTTPRequestHandler):
    """Answers the calls kfp.Client makes to create a run (healthz, experiments, runs) and records them."""

    requests = []
    run_state = "SUCCEEDED"
    require = None  # (header, value) every request must carry, as a multi-user Kubeflow's gateway asks
    # The API server's own answer (through the UI's proxy its fields are named otherwise).
    healthz = healthz_default = {"multi_user": False, "tag_name": COMPILER, "commit_sha": "0" * 40}

    def _refused(self) -> bool:
        if self.require is None or self.headers.get(self.require[0]) == self.require[1]:
            return False
        data = json.dumps({"error": "unauthenticated", "code": 16, "message": "no valid credentials"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return True

    def _reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.requests.append(("GET", self.path, None))
        if self._refused():
            return
        if self.path.startswith("/apis/v2beta1/healthz"):
            return self._reply(self.healthz)
        if self.path.startswith("/apis/v2beta1/runs/"):
            return self._reply({"run_id": "run-1", "state": self.run_state})
        return self._reply({})  # experiment lookup by name: none yet

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.requests.append(("POST", self.path, body))
        if self._refused():
            return
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._reply({"experiment_id": "exp-1", "display_name": body.get("display_name")})
        if self.path.startswith("/apis/v2beta1/runs"):
            return self._reply({"run_id": "run-1", "display_name": body.get("display_name")})
        self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_api():
    FakeKfpApi.requests = []
    FakeKfpApi.require = None
    FakeKfpApi.healthz = dict(FakeKfpApi.healthz_default)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfpApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", FakeKfpApi
    server.shutdown()
    server.server_close()


def test_submit_creates_a_run_with_typed_parameters(kfp_api, capsys):
    host, api = kfp_api
    code = main(["submit", "--host", host, "--target", "ascend", "--experiment", "imagenet",
                 "-p", "data_uri=/data/imagenet", "-p", "devices=8", "-p", "lr=0.4", "-p", "epochs=90"])
    assert code == 0
    assert "submitted run run-1" in capsys.readouterr().out
    (_, _, experiment), = [r for r in api.requests if r[0] == "POST" and r[1].endswith("/experiments")]
    assert experiment["display_name"] == "imagenet"
    (_, _, run), = [r for r in api.requests if r[0] == "POST" and r[1].endswith("/runs")]
    assert run["experiment_id"] == "exp-1"
    assert run["runtime_config"]["parameters"] == {"data_uri": "/data/imagenet", "devices": 8, "lr": 0.4,
                                                   "epochs": 90.0}
    assert run["service_account"] == images.SERVICE_ACCOUNT
    spec = run["pipeline_spec"]
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "hrnet-classification"
    train = spec["pipeline_spec"]["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert train["resources"]["accelerator"]["resourceType"] == "huawei.com/Ascend910"
    assert "exec-train" in spec["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_submit_wait_reports_a_failed_run(kfp_api, capsys):
    host, api = kfp_api
    api.run_state = "FAILED"
    try:
        code = main(["submit", "--host", host, "--target", "cpu", "-p", "data_uri=/data/x", "--wait"])
    finally:
        api.run_state = "SUCCEEDED"
    assert code == 1
    assert "finished: FAILED" in capsys.readouterr().out


def test_submit_a_compiled_package(kfp_api, tmp_path):
    host, api = kfp_api
    package = tmp_path / "hrnet-gpu.yaml"
    assert main(["compile", "--target", "gpu", "-o", str(package)]) == 0
    assert main(["submit", "--host", host, "--package", str(package), "--service-account", "",
                 "-p", "data_uri=s3://bucket/imagenet-tfrecords"]) == 0
    (_, _, run), = [r for r in api.requests if r[0] == "POST" and r[1].endswith("/runs")]
    executors = run["pipeline_spec"]["pipeline_spec"]["deploymentSpec"]["executors"]
    assert executors["exec-train"]["container"]["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert "service_account" not in run or not run["service_account"]


def test_unreachable_host_is_one_clear_line(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["submit", "--host", f"http://127.0.0.1:{port}", "-p", "data_uri=/data/x"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"cannot reach Kubeflow Pipelines at http://127.0.0.1:{port}" in err
    assert "Traceback" not in err


def test_a_backend_older_than_the_pipeline_needs_is_refused_before_a_run_is_made(kfp_api, capsys):
    host, api = kfp_api
    api.healthz = {"multi_user": False, "tag_name": "2.2.0"}
    code = main(["submit", "--host", host, "--target", "cpu", "-p", "data_uri=/data/x"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        f"python -m pipelines submit: error: Kubeflow Pipelines at {host} is 2.2.0; the pipeline needs 2.3 or "
        "later (its train step mounts emptyDirs, kubeflow/pipelines#10913)"]
    assert not [r for r in api.requests if r[0] == "POST"]


@pytest.mark.parametrize("healthz, warning", [
    # Through ml-pipeline-ui's proxy (a port-forward of the UI, Kubeflow's gateway) the field is renamed.
    ({"apiServerTagName": COMPILER, "apiServerMultiUser": False, "multi_user": False}, None),
    ({"multi_user": False}, "does not say its version; the pipeline needs 2.3 or later"),
    ({"multi_user": False, "tag_name": "2.3.1"}, "older than the kfp-kubernetes"),
])
def test_backend_version_from_either_healthz_answer(kfp_api, capsys, healthz, warning):
    host, api = kfp_api
    api.healthz = healthz
    assert main(["submit", "--host", host, "--target", "cpu", "-p", "data_uri=/data/x"]) == 0
    err = capsys.readouterr().err
    assert (warning in err) if warning else "submit:" not in err, err
    assert [r for r in api.requests if r[0] == "POST" and r[1].endswith("/runs")]


def test_parameters_are_typed_and_checked():
    assert parse_arguments(["devices=8", "lr=0.1", "model=w32", "seed=3"]) == {
        "devices": 8, "lr": 0.1, "model": "w32", "seed": 3}
    with pytest.raises(UsageError, match="unknown pipeline parameter 'device'.*devices"):
        parse_arguments(["device=8"])
    with pytest.raises(UsageError, match="devices='eight' is not a valid int"):
        parse_arguments(["devices=eight"])
    with pytest.raises(UsageError, match="not key=value"):
        parse_arguments(["devices"])
    assert parse_arguments(['train_config={"schedule": "cosine", "flip": false}']) == {
        "train_config": {"schedule": "cosine", "flip": False}}
    with pytest.raises(UsageError, match=r"train_config='\[1\]' is not a valid mapping: not a JSON object"):
        parse_arguments(["train_config=[1]"])
    with pytest.raises(UsageError, match="train_config='{schedule' is not a valid mapping: not JSON"):
        parse_arguments(["train_config={schedule"])


def test_missing_package_is_reported(tmp_path, capsys):
    code = main(["submit", "--host", "http://127.0.0.1:1", "--package", str(tmp_path / "nope.yaml"),
                 "-p", "data_uri=/data/x"])
    assert code == 2
    assert "no such pipeline package" in capsys.readouterr().err


def test_a_run_without_its_data_is_refused_before_anything_is_sent(kfp_api, capsys):
    host, api = kfp_api
    code = main(["submit", "--host", host, "--target", "cpu", "-p", "devices=1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "the run needs -p data_uri=...: The data, required" in err
    assert not api.requests


@pytest.mark.parametrize("flag, header, secret", [("--token-file", "Authorization", "Bearer tok-3f9a1c"),
                                                  ("--cookies-file", "Cookie", "authservice_session=ses-77b2e0")])
def test_submit_to_a_multi_user_kubeflow_sends_the_token_or_cookies_and_never_prints_them(
        kfp_api, tmp_path, capsys, flag, header, secret):
    host, api = kfp_api
    api.require = (header, secret)
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret.replace("Bearer ", "") + "\n")
    args = ["submit", "--host", host, "--target", "cpu", "--namespace", "alice", "-p", "data_uri=/data/x"]

    assert main(args) == 2  # without credentials: one line saying what a multi-user Kubeflow needs
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "refused the request (401" in err and "--token-file or --cookies-file" in err
    assert "Traceback" not in err

    assert main(args + [flag, str(secret_file)]) == 0
    out, err = capsys.readouterr()
    assert "submitted run run-1" in out
    (_, _, run), = [r for r in api.requests if r[0] == "POST" and r[1].endswith("/runs")]
    assert secret.split("-")[-1] not in out + err + json.dumps(run)

    secret_file.write_text("")
    assert main(args + [flag, str(secret_file)]) == 2 and "is empty" in capsys.readouterr().err
