"""The steps in their real images: the whole pipeline in the cpu image (kfp.local's
DockerRunner, each step a container), against a real S3 server (SeaweedFS), once from an
image tree in a bucket and once from TFRecords in a bucket; and the Ascend image's Python
layer (TF 2.6.5, kfp 2.5.0, hrnet) on a Python 3.9 stand-in for the CANN base.

What makes these fail: a step's image lacking a dependency, a component importing what its
image does not have, a step that cannot write the pipeline root as the image's user, or a
train / evaluate step that fetches more of the data set than the split it reads.

The images come from `make images-local` (images/base/make-base.sh bases, then the
Dockerfiles); `make test` builds them first, with a Docker engine it starts itself.
"""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest
from test_images import lock

from components import images

# The module fixture runs the pipeline twice, each run within run_pipeline's 1200 s.
pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(2700)]

CPU_IMAGE = images.IMAGES["cpu"]
ASCEND_STANDIN = os.environ.get("HRNET_ASCEND_STANDIN_IMAGE", f"hrnet-ascend-standin:{images.TAG}")
# Short and far above chance on the digits (10 classes): the same recipe as the demo, 2 epochs.
RUN_FLAGS = ["--epochs", "2", "--image-size", "32", "--seed", "1"]


def docker(*args, timeout=600):
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def need_image(name):
    try:
        found = docker("image", "inspect", name, timeout=30).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        found = False
    if not found:
        message = f"no image {name} (or no Docker engine): run `images/with-docker.sh make images-local`"
        if os.environ.get("HRNET_REQUIRE_CONTAINERS"):
            pytest.fail(message)
        pytest.skip(message)


def sections(output):
    """The pipeline's output cut into {task: its lines}, by kfp.local's 'Executing task' lines."""
    found, current = {}, None
    for line in output.splitlines():
        m = re.search(r"Executing task \S*?'([\w-]+)'", line)
        if m:
            current = re.sub(r"-\d+$", "", m.group(1))  # the second branch's copies: train-2 ...
            found.setdefault(current, [])
        elif current:
            found[current].append(line)
    return found


SHARD = re.compile(r"(\w+)-\d+-of-\d+$")  # a data set's shard file, e.g. train-00000-of-00002


def splits_read(lines):
    """The data set splits a step fetched: streamed (hrnet.data.stream's "streaming N SPLIT shards") or
    downloaded (hrnet.storage's partial-download lines, which name the files)."""
    splits = set()
    for line in lines:
        m = re.search(r"streaming \d+ (\w+) shards", line)
        if m:
            splits.add(m.group(1))
        m = re.search(r"downloading \d+ of \d+ files \((.*): this step reads", line)
        if m:
            splits.update(shard.group(1) for shard in map(SHARD.match, m.group(1).split(", ")) if shard)
    return splits


def run_pipeline(tmp_path, name, *flags):
    workdir = tmp_path / name
    command = [sys.executable, "-m", "pipelines", "run-local", "--runner", "docker", "--workdir", str(workdir),
               "--verbose", *RUN_FLAGS, *flags]  # every step's output on stdout, for sections()
    done = subprocess.run(command, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-6000:]
    top1 = float(re.search(r"top-1 ([\d.]+)%", done.stdout).group(1)) / 100
    return workdir, top1, sections(done.stdout)


@pytest.fixture(scope="module")
def bucket_runs(seaweedfs_server, tmp_path_factory):
    """Both runs against one bucket: from images, then from the records the first one made."""
    need_image(CPU_IMAGE)
    from s3server import apply_env, env_for, make_bucket

    from hrnet.data.demo import write_demo_data

    tmp = tmp_path_factory.mktemp("containers")
    monkeypatch = pytest.MonkeyPatch()
    bucket = make_bucket(seaweedfs_server)
    apply_env(monkeypatch, env_for(seaweedfs_server, str(tmp / "cache")))
    try:
        write_demo_data(f"s3://{bucket}/demo")
        records = f"s3://{bucket}/datasets/demo"
        from_images = run_pipeline(tmp, "from-images", "--data-uri", f"s3://{bucket}/demo",
                                   "--datasets-uri", records)
        from_records = run_pipeline(tmp, "from-records", "--data-uri", records)
        yield {"images": from_images, "records": from_records, "bucket": bucket}
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("run", ["images", "records"])
def test_the_pipeline_runs_in_the_cpu_image_against_a_real_bucket(bucket_runs, run):
    workdir, top1, steps = bucket_runs[run]
    expected = ["validate", "prepare-data", "train", "evaluate", "export", "deploy",
                "record-run"]
    assert [s for s in expected if s in steps] == expected, sorted(steps)
    assert top1 > 0.5, top1  # chance is 0.1
    # The SavedModel in its version folder, as KServe's TensorFlow runtime loads it from a storageUri.
    (version,) = [root for root, _, files in os.walk(workdir) if "saved_model.pb" in files]
    assert os.path.basename(version) == "1" and os.path.exists(os.path.join(version, "..", "manifest.json"))
    # The evaluate step's report, drawn in the image: its three figures and its mistakes' thumbnails.
    (report,) = glob.glob(os.path.join(workdir, "**", "evaluate*", "report"), recursive=True)
    with open(report, encoding="utf-8") as f:
        page = f.read()
    assert re.findall(r'<figure id="(\w+)"', page) == ["curves", "confusion", "classes"]
    assert page.count('<img src="data:image/png;base64,') > 0


@pytest.mark.parametrize("run", ["images", "records"])
def test_train_and_evaluate_fetch_only_the_splits_they_read(bucket_runs, run):
    _, _, steps = bucket_runs[run]
    train, evaluate = splits_read(steps["train"]), splits_read(steps["evaluate"])
    # Train validates every epoch by default, so it reads both splits; evaluate reads one.
    assert train == {"train", "validation"}, steps["train"][-40:]
    assert evaluate == {"validation"}, steps["evaluate"][-40:]
    # And the Dataset artifact KFP hands each step is a reference, not the records.
    assert not [ln for ln in steps["train"] + steps["evaluate"] if re.search(r"Downloading .*tfrecords", ln)]


def test_the_ascend_python_layer_runs_tf_2_6_on_python_3_9():
    """The Ascend image's whole Python layer (TF 2.6.5 with Keras 2, kfp 2.5.0, hrnet) on a
    Debian bullseye stand-in for the CANN base: everything but --device npu, for real."""
    need_image(ASCEND_STANDIN)
    script = " && ".join([
        "python3 -c 'import sys, tensorflow as tf, kfp; print(\"versions\", sys.version.split()[0], tf.__version__, "
        "kfp.__version__)'",
        "hrnet info --model w18_small_v1",
        "hrnet demo-data --out /tmp/demo",
        "hrnet convert --src /tmp/demo --out /tmp/records --no-progress",
        "hrnet train --data /tmp/records --out /tmp/run --model w18_small_v1 --image-size 32 --batch-size 8 "
        "--train-steps 3 --log-every 1 --seed 1",
        # Training validated at its end and kept the best weights: evaluate and export take them.
        "hrnet evaluate --data /tmp/records --checkpoint /tmp/run --out /tmp/eval",
        # The evaluate step's report, drawn by this image's older matplotlib (numpy 1.19).
        "python3 -c " + shlex.quote(
            "import re, matplotlib; from hrnet.report import write_report; "
            "page = open(write_report('/tmp/report.html', '/tmp/run', '/tmp/eval')).read(); "
            "print('report', matplotlib.__version__, re.findall('<figure id=.(\\w+)', page), page.count('<img '))"),
        "hrnet export --checkpoint /tmp/run --out /tmp/export --no-onnx",
        "ls /tmp/export/1 /tmp/export/frozen",
    ])
    done = docker("run", "--rm", "--network", "none", ASCEND_STANDIN, "bash", "-c", script, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert re.search(r"versions 3\.9\.\d+ 2\.6\.5 2\.5\.0", output), output[-3000:]
    assert "13,187,464" in output  # w18_small_v1's official parameter count
    assert "step 3/3" in output and "saved_model.pb" in output and "hrnet.pb" in output
    assert re.search(r"w18_small_v1 \(best weights, step 3\): top-1 [\d.]+%", output), output[-3000:]
    report = re.search(r"report (\S+) \[(.*)\] (\d+)", output)
    assert report and report[1] == lock("ascend")["matplotlib"], output[-3000:]
    assert report[2] == "'curves', 'confusion', 'classes'" and int(report[3]) > 0, report[0]


def test_hrnet_serve_runs_in_the_cpu_image(bucket_runs, tmp_path):
    """`hrnet serve` in the cpu image (what the deploy step's hrnet runtime runs) on the run's
    export, over V1 and V2 from the host, on demo images it classifies far above chance."""
    import base64
    import json
    import time
    import urllib.error
    import urllib.request

    from s3server import free_port

    from hrnet.data.demo import write_demo_data

    workdir, _, _ = bucket_runs["records"]
    (version,) = [root for root, _, files in os.walk(workdir) if "saved_model.pb" in files]
    port = free_port()
    started = docker("run", "-d", "--rm", "--network", "host", "-v", f"{os.path.dirname(version)}:/export:ro",
                     CPU_IMAGE, "hrnet", "serve", "--model", "/export", "--port", str(port))
    assert started.returncode == 0, started.stderr
    container = started.stdout.strip()
    url = f"http://127.0.0.1:{port}"

    def post(path, body):
        request = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            return json.load(answer)

    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "/v2/health/ready", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            logs = docker("logs", container, timeout=30)
            assert time.monotonic() < deadline and docker("inspect", container, timeout=30).returncode == 0, \
                (logs.stdout + logs.stderr)[-3000:]
            time.sleep(1)
        write_demo_data(str(tmp_path / "demo"))
        root = tmp_path / "demo" / "validation"
        images = [(root / c / f, c) for c in sorted(os.listdir(root)) for f in sorted(os.listdir(root / c))[:4]]
        b64 = [base64.b64encode(path.read_bytes()).decode() for path, _ in images]
        v1 = post("/v1/models/hrnet:predict", {"instances": [{"b64": b} for b in b64]})["predictions"]
        right = sum(p["names"][0] == c for p, (_, c) in zip(v1, images))
        assert right > 0.5 * len(images), (right, len(images))  # chance is 0.1
        v2 = post("/v2/models/hrnet/infer", {"inputs": [{"name": "image_bytes", "datatype": "BYTES",
                                                         "shape": [len(b64)], "data": b64}]})
        classes = next(o for o in v2["outputs"] if o["name"] == "classes")
        top = [classes["data"][i * classes["shape"][1]] for i in range(len(b64))]
        assert top == [p["classes"][0] for p in v1]
    finally:
        docker("rm", "-f", container, timeout=60)
