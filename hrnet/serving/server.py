"""``hrnet serve``: an export behind KServe's model server, the one KServe's own runtimes use.

    hrnet serve --model EXPORT [--name hrnet] [--port 8080]

- V1, TensorFlow Serving's REST API: ``POST /v1/models/NAME:predict`` with
  ``{"instances": [{"b64": "<base64 JPEG or PNG>"}, ...]}`` -> ``{"predictions": [{"classes",
  "names", "probabilities"}, ...]}`` (top-k, best first); or with preprocessed images
  (float32 [size, size, 3], normalized as in training) as instances -> ``{"predictions":
  [{"logits", "probabilities"}, ...]}``.
- V2, the Open Inference Protocol: ``POST /v2/models/NAME/infer`` with an input
  ``image_bytes`` (BYTES [N], base64 strings) -> outputs ``classes``, ``names``,
  ``probabilities``; or ``images`` (FP32 [N, size, size, 3]) -> ``logits``, ``probabilities``.
- Liveness ``GET /v2/health/live``; readiness ``GET /v2/health/ready`` and ``GET
  /v1/models/NAME``. The model is loaded before the server listens (KServe's own runtimes
  do the same), so whatever answers is ready.
- A request the model cannot take (not JSON, no instances, bad base64, an image it cannot
  decode, a tensor of the wrong shape) is a 400 naming the problem; the server goes on.

KServe's server listens on every interface (0.0.0.0): in a pod that is what a Service needs.
The network runs on the SavedModel or under ONNX Runtime (``--runtime``; by default the faster
here where their logits agree: hrnet.serving.runtimes), and the log says which.
Batching of concurrent requests is KServe's agent's (the InferenceService's ``batcher``), not
this process's.
"""
import asyncio
import base64
import binascii
import logging
import sys
import uuid
from typing import Any, Dict, List

from hrnet.errors import HrnetError
from hrnet.serving.predict import add_runtime_argument

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080
DEFAULT_NAME = "hrnet"


def _kserve():
    """kserve, imported with an empty command line: its model_server module parses
    sys.argv when imported, and would take our --model for its own flags."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        import kserve
    except ImportError:
        raise HrnetError("hrnet serve needs KServe's Python server: pip install 'hrnet[serve]' (kserve)") from None
    finally:
        sys.argv = argv
    return kserve


def _decode_b64(value: Any, where: str) -> bytes:
    if isinstance(value, dict) and set(value) == {"b64"}:
        value = value["b64"]
    if not isinstance(value, str):
        raise ValueError("%s: expected base64 image bytes ({\"b64\": \"...\"} in V1, a string in V2)" % where)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("%s: not valid base64" % where) from None


def _classified(exported, images: List[bytes]) -> List[Dict[str, Any]]:
    from hrnet.serving.exported import BadImage

    results = exported.classify(images)
    bad = [(i, r.reason) for i, r in enumerate(results) if isinstance(r, BadImage)]
    if bad:
        raise ValueError("instance %d is not an image the model can decode (%s)%s" % (
            bad[0][0], bad[0][1], " and %d more" % (len(bad) - 1) if len(bad) > 1 else ""))
    return [r.as_dict() for r in results]


def _tensors(exported, instances) -> Dict[str, Any]:
    import numpy as np

    try:
        images = np.asarray(instances, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError("instances: expected base64 images or float images of one shape") from None
    size = exported.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError("images: expected shape [N, %d, %d, 3], got %s" % (size, size, list(images.shape)))
    return exported.logits(images)


def predict_v1(exported, body: Any) -> Dict[str, Any]:
    """A V1 (TensorFlow Serving REST) request body -> its response body."""
    if not isinstance(body, dict) or not isinstance(body.get("instances"), list) or not body["instances"]:
        raise ValueError('expected a JSON object {"instances": [...]} with at least one instance')
    instances = body["instances"]
    if isinstance(instances[0], (dict, str)):
        return {"predictions": _classified(exported, [_decode_b64(v, "instance %d" % i)
                                                      for i, v in enumerate(instances)])}
    out = _tensors(exported, instances)
    return {"predictions": [{"logits": out["logits"][i].tolist(), "probabilities": out["probabilities"][i].tolist()}
                            for i in range(len(instances))]}


def predict_v2(exported, inputs: Dict[str, Any]) -> Dict[str, Any]:
    """V2 inputs by name (numpy arrays) -> outputs by name (numpy arrays)."""
    import numpy as np

    if set(inputs) == {"image_bytes"}:
        raw = inputs["image_bytes"].reshape(-1)
        images = [_decode_b64(v.decode("utf-8") if isinstance(v, bytes) else v, "image_bytes[%d]" % i)
                  for i, v in enumerate(raw)]
        results = _classified(exported, images)
        return {"classes": np.array([r["classes"] for r in results], dtype=np.int32),
                "names": np.array([r["names"] for r in results], dtype=object),
                "probabilities": np.array([r["probabilities"] for r in results], dtype=np.float32)}
    if set(inputs) == {"images"}:
        return _tensors(exported, inputs["images"])
    raise ValueError("expected one input, image_bytes (BYTES, base64) or images (FP32 [N, %d, %d, 3]); got %s"
                     % (exported.image_size, exported.image_size, sorted(inputs) or "none"))


def make_model(kserve, name: str, uri: str, runtime: str = "auto"):
    """A kserve.Model serving the export at ``uri``."""
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    from hrnet.serving.exported import Exported

    class HrnetModel(kserve.Model):
        def __init__(self):
            super().__init__(name)
            self.exported = None

        def load(self) -> bool:
            self.exported = Exported(uri, runtime)
            self.ready = True
            return self.ready

        async def predict(self, payload, headers=None, response_headers=None):
            loop = asyncio.get_running_loop()
            try:
                if isinstance(payload, InferRequest):
                    inputs = {i.name: i.as_numpy() for i in payload.inputs}
                    out = await loop.run_in_executor(None, predict_v2, self.exported, inputs)
                    outputs = [InferOutput(k, list(v.shape), _v2_type(v), v.tolist()) for k, v in out.items()]
                    return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
                                         infer_outputs=outputs)
                return await loop.run_in_executor(None, predict_v1, self.exported, payload)
            except ValueError as e:  # what the request asked for, not the server, is wrong
                raise InvalidInput(str(e)) from None

    return HrnetModel()


def _v2_type(array) -> str:
    return {"int32": "INT32", "float32": "FP32", "object": "BYTES"}[str(array.dtype)]


def serve(model: str, name: str = DEFAULT_NAME, port: int = DEFAULT_PORT, runtime: str = "auto") -> None:
    kserve = _kserve()
    served = make_model(kserve, name, model, runtime)
    served.load()
    log.info("serving %s as %r on port %d with %s (V1 /v1/models/%s:predict, V2 /v2/models/%s/infer)", model, name,
             port, served.exported.runtime.name, name, name)
    kserve.ModelServer(http_port=port, enable_grpc=False, workers=1).start([served])


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="the export (folder or URI) of `hrnet export`")
    parser.add_argument("--name", default=DEFAULT_NAME, help="the model's name in request paths (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default: %(default)s)")
    add_runtime_argument(parser)


def run(args) -> int:
    if not 0 < args.port < 65536:
        raise ValueError("--port must be between 1 and 65535, got %d" % args.port)
    serve(args.model, args.name, args.port, args.runtime)
    return 0
