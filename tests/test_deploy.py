"""Serving on KServe (hrnet.serving.deploy: ``hrnet deploy`` and the pipeline's deploy step):
the InferenceService it makes against KServe's CRD, and creating, updating, waiting for Ready
and failing against the Kubernetes API stand-in (tests/k8s_standin.py), whose KServe
controller reports a model it cannot find in the store (SeaweedFS, real) as KServe reports a
failed load. Not real: KServe itself and the predictor's pods (no API server runs here)."""
import os
import subprocess
import sys
from pathlib import Path

import crd_schema
import pytest
import yaml
from k8s_standin import Cluster, write_kubeconfig

from hrnet import storage
from hrnet.errors import HrnetError
from hrnet.serving import deploy

ROOT = Path(__file__).resolve().parents[1]


def model_in_store(isvc):
    """What KServe's storage initializer meets: a SavedModel version folder under storageUri, or not."""
    predictor = isvc["spec"]["predictor"]
    uri = predictor["model"]["storageUri"] if "model" in predictor else predictor["containers"][0]["args"][3]
    if not storage.exists(uri + "/1/saved_model.pb"):
        return f"failed to download {uri}: no SavedModel (1/saved_model.pb) there"
    return None


@pytest.fixture
def export_uri(s3_env):
    """An export's layout in the bucket: enough for the stand-in's storage check."""
    uri = s3_env.uri("runs/a/export")
    storage.write_text(uri + "/1/saved_model.pb", "not read here")
    return uri


def _deploy(k8s, uri, name="hrnet", **kwargs):
    body = deploy.inference_service(name, "hrnet", uri, **kwargs)
    return deploy.deploy(body, api_client=k8s.api_client(), timeout=30, interval=0.05)


@pytest.mark.parametrize("runtime", deploy.RUNTIMES)
def test_the_inference_service_matches_kserves_crd(runtime):
    body = deploy.inference_service("hrnet", "hrnet", "minio://mlpipeline/v2/artifacts/run/export", runtime,
                                    image="repo/hrnet-cpu:1")
    crd_schema.validate(body)
    predictor = body["spec"]["predictor"]
    if runtime == "tensorflow":
        assert predictor["model"]["storageUri"] == "s3://mlpipeline/v2/artifacts/run/export"  # KFP's minio://
    else:
        (container,) = predictor["containers"]
        assert container["args"][:4] == ["hrnet", "serve", "--model", "s3://mlpipeline/v2/artifacts/run/export"]
        assert {e["name"] for e in container["env"]} == {"S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_the_manifest_users_apply_is_the_deploy_steps_object():
    with open(ROOT / "manifests" / "kserve" / "inferenceservice.yaml") as f:
        manifest = yaml.safe_load(f)
    uri = manifest["spec"]["predictor"]["model"]["storageUri"]
    assert manifest == deploy.inference_service("hrnet", "hrnet", uri, labelled=False)


def test_created_then_updated_on_rerun_each_time_ready(tmp_path, s3_env, export_uri):
    with Cluster(str(tmp_path), isvc_check=model_in_store) as k8s:
        assert _deploy(k8s, export_uri) == "http://hrnet.hrnet.example.com"
        (made,) = k8s.created
        assert made["spec"]["predictor"]["model"]["storageUri"] == export_uri
        # A rerun with a new export replaces the spec of the same service: a new generation.
        newer = s3_env.uri("runs/b/export")
        storage.write_text(newer + "/1/saved_model.pb", "not read here")
        assert _deploy(k8s, newer, runtime="hrnet", image="repo/hrnet-cpu:2") == "http://hrnet.hrnet.example.com"
        (replaced,) = k8s.replaced
        assert replaced["metadata"]["generation"] == 2 and len(k8s.created) == 1
        assert "model" not in replaced["spec"]["predictor"]
        assert replaced["spec"]["predictor"]["containers"][0]["args"][3] == newer
        assert [m for m, p in k8s.requests if p.endswith("/inferenceservices/hrnet")].count("PUT") == 1


def test_a_model_that_cannot_load_fails_with_kserves_reason(tmp_path, s3_env):
    missing = s3_env.uri("runs/none/export")
    with Cluster(str(tmp_path), isvc_check=model_in_store) as k8s:
        with pytest.raises(deploy.DeployFailed) as failed:
            _deploy(k8s, missing)
    assert str(failed.value) == (f"InferenceService hrnet/hrnet failed: ModelLoadFailed: failed to download "
                                 f"{missing}: no SavedModel (1/saved_model.pb) there")


def test_not_ready_in_time_says_what_it_waited_for(tmp_path):
    with Cluster(str(tmp_path), isvc_stuck=True) as k8s:
        body = deploy.inference_service("hrnet", "hrnet", "s3://b/export")
        with pytest.raises(deploy.DeployFailed, match=r"not Ready after 0.5 s \(RevisionMissing: Configuration "):
            deploy.deploy(body, api_client=k8s.api_client(), timeout=0.5, interval=0.05)


def test_a_service_hrnet_did_not_make_is_left_alone(tmp_path, export_uri):
    with Cluster(str(tmp_path)) as k8s:
        theirs = deploy.inference_service("hrnet", "hrnet", "s3://theirs/model", labelled=False)
        k8s.api_client().call_api("/apis/serving.kserve.io/v1beta1/namespaces/hrnet/inferenceservices", "POST",
                                  body=theirs, response_type="object", _return_http_data_only=True)
        with pytest.raises(HrnetError, match="exists and was not made by hrnet deploy .* left alone"):
            _deploy(k8s, export_uri)
        assert not k8s.replaced
        assert k8s.objects[("inferenceservices", "hrnet", "hrnet")]["spec"]["predictor"]["model"]["storageUri"] == \
            "s3://theirs/model"


def test_the_step_serves_its_export_and_returns_the_url(tmp_path, export_uri, monkeypatch):
    """components/deploy.py as KFP runs it: the Model artifact's URI is the storageUri."""
    from kfp.dsl import Model

    from components.deploy import deploy as step

    with Cluster(str(tmp_path), isvc_check=model_in_store) as k8s:
        monkeypatch.setenv("KUBECONFIG", write_kubeconfig(tmp_path, k8s))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("POD_NAMESPACE", "hrnet")
        url = step.python_func(exported=Model(uri=export_uri), enabled=True, name="digits", runtime="tensorflow",
                               image="", timeout=30.0)
        (made,) = k8s.created
    assert url == "http://digits.hrnet.example.com"
    assert made["metadata"]["labels"][deploy.LABEL] == "digits"


def test_the_cli_prints_the_url_or_one_line(tmp_path, export_uri):
    env = dict(os.environ, KUBECONFIG=write_kubeconfig(tmp_path, None))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    command = [sys.executable, "-m", "hrnet", "deploy", "--namespace", "hrnet", "--interval", "0.05"]
    down = subprocess.run(command + ["--model", export_uri], env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 2 and "Traceback" not in down.stderr
    assert down.stderr.strip().splitlines()[-1].startswith("hrnet deploy: error: cannot reach the Kubernetes API "
                                                           "at http://127.0.0.1:1 to read InferenceService")
    with Cluster(str(tmp_path), isvc_check=model_in_store) as k8s:
        write_kubeconfig(tmp_path, k8s)
        good = subprocess.run(command + ["--model", export_uri], env=env, capture_output=True, text=True, timeout=60)
        assert good.returncode == 0 and good.stdout == "http://hrnet.hrnet.example.com\n", good.stderr
        bad = subprocess.run(command + ["--model", export_uri + "-none", "--name", "other"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "Traceback" not in bad.stderr
        assert bad.stderr.strip().splitlines()[-1].startswith("hrnet deploy: InferenceService hrnet/other failed: "
                                                              "ModelLoadFailed: failed to download")
        local = subprocess.run(command + ["--model", str(tmp_path)], env=env, capture_output=True, text=True,
                               timeout=60)
        assert local.returncode == 2 and "is not in object storage" in local.stderr.strip().splitlines()[-1]
