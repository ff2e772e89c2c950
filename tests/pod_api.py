"""A stand-in for the Kubernetes API server's pod endpoint, as the Ascend launcher reads the
device plugin's annotation from it (tests/test_ranktable.py, tests/test_launch.py)."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from hrnet.runtime import ranktable

ANNOTATION_VALUE = {
    "pod_name": "train-0",
    "server_id": "10.0.0.7",
    "devices": [
        {"device_id": "5", "device_ip": "192.168.101.5"},
        {"device_id": "4", "device_ip": "192.168.100.4"},
    ],
}


class FakeApiServer:
    """A local HTTP endpoint answering GET pod like the Kubernetes API server; the device plugin's
    annotation shows up only from the ``annotate_after``-th read of the pod on."""

    def __init__(self, name="train-0", namespace="kubeflow", annotate_after=3, status=200):
        self.name, self.namespace = name, namespace
        self.annotate_after, self.status = annotate_after, status
        self.reads = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] != f"/api/v1/namespaces/{server.namespace}/pods/{server.name}":
                    return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                            "reason": "NotFound", "code": 404})
                server.reads += 1
                if server.status != 200:
                    return self._send(server.status, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                      "code": server.status})
                metadata = {"name": server.name, "namespace": server.namespace, "annotations": {"other": "x"}}
                if server.annotate_after is not None and server.reads >= server.annotate_after:
                    metadata["annotations"][ranktable.ANNOTATION] = json.dumps(ANNOTATION_VALUE)
                self._send(200, {"apiVersion": "v1", "kind": "Pod", "metadata": metadata})

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def configuration(self):
        from kubernetes import client

        config = client.Configuration()
        config.host = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        return config

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
