"""An exported model (the folder or URI ``hrnet export`` wrote) loaded for inference: what
``hrnet predict`` and ``hrnet serve`` share.

The export's ``classify_bytes`` signature decodes and preprocesses in the graph, exactly as
evaluation does, so a prediction here is the one ``hrnet evaluate`` counts. It decodes a
whole batch at once: a batch holding an image it cannot decode fails as a whole, and is then
classified one image at a time, so that only the bad image is reported.

The network itself runs on the SavedModel or under ONNX Runtime (hrnet.serving.runtimes picks,
and says which); decoding and cropping are TensorFlow's either way.
"""
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Union

from hrnet import storage
from hrnet.errors import HrnetError, first_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """The top-k of one image, best first."""

    classes: List[int]
    names: List[str]
    probabilities: List[float]

    def as_dict(self) -> Dict[str, Any]:
        return {"classes": self.classes, "names": self.names, "probabilities": self.probabilities}


@dataclass(frozen=True)
class BadImage:
    """An input the model could not read, and why (TensorFlow's decoder's words)."""

    reason: str


class Exported:
    """The SavedModel of an export, its signatures and what its manifest says of it."""

    def __init__(self, uri: str, runtime: str = "auto"):
        import tensorflow as tf

        from hrnet.serving import runtimes

        local = storage.local_input(uri)  # verified against the export's manifest
        with open(os.path.join(local, "manifest.json")) as f:
            manifest = json.load(f)
        if manifest.get("kind") != "export":
            raise HrnetError("%s is not an export of `hrnet export` (its manifest says kind %r)"
                             % (uri, manifest.get("kind")))
        self.uri = uri
        self.manifest = manifest
        self.image_size = int(manifest["image_size"])
        self.num_classes = int(manifest["num_classes"])
        self.version = int(manifest["saved_model"].get("version", 1))
        loaded = tf.saved_model.load(os.path.join(local, manifest["saved_model"]["path"]))
        self._loaded = loaded  # the signatures hold only weak references to it
        self._classify = loaded.signatures["classify_bytes"]
        self._images = loaded.signatures["serving_default"]
        self.top_k = int(self._classify.structured_outputs["classes"].shape[-1])
        self.runtime, self._onnx = runtimes.choose(runtime, local, manifest, self._savedmodel_logits)
        if self._onnx is not None:
            from hrnet.export import decode_batch

            self._decoder = tf.function(lambda b: decode_batch(b, self.image_size),
                                        input_signature=[tf.TensorSpec([None], tf.string)])
        log.info("loaded %s (%s, %d classes, %dx%d, version %d) on %s: %s", uri, manifest["model"], self.num_classes,
                 self.image_size, self.image_size, self.version, self.runtime.name, self.runtime.reason)

    def _savedmodel_logits(self, images):
        import tensorflow as tf

        return self._images(images=tf.convert_to_tensor(images, dtype=tf.float32))["logits"].numpy()

    def _decode(self, images: Sequence[bytes]):
        """Encoded images -> float32 numpy [N, size, size, 3], as the export's classify_bytes decodes them."""
        import tensorflow as tf

        return self._decoder(tf.constant(list(images), dtype=tf.string)).numpy()

    def _onnx_top_k(self, images: Sequence[bytes]):
        """(classes, names, probabilities) of classify_bytes, with the network under ONNX Runtime."""
        import numpy as np

        probabilities = _softmax(self._onnx(self._decode(images)))
        classes = np.argsort(-probabilities, axis=-1, kind="stable")[:, :self.top_k].astype(np.int32)
        names = np.asarray(self.manifest["class_names"], dtype=object)[classes]
        return classes, names, np.take_along_axis(probabilities, classes, axis=-1)

    def classify(self, images: Sequence[bytes]) -> List[Union[Prediction, BadImage]]:
        """The top-k of each encoded image (JPEG, PNG, BMP, GIF), in order."""
        import tensorflow as tf

        if not images:
            return []
        try:
            if self._onnx is not None:
                classes, names, probabilities = self._onnx_top_k(images)
            else:
                out = self._classify(image_bytes=tf.constant(list(images), dtype=tf.string))
                classes, names, probabilities = (out["classes"].numpy(),
                                                 [[n.decode("utf-8") for n in row] for row in out["names"].numpy()],
                                                 out["probabilities"].numpy())
        except tf.errors.InvalidArgumentError as e:
            if len(images) == 1:
                return [BadImage(first_line(e))]
            return [r for image in images for r in self.classify([image])]
        return [Prediction([int(c) for c in classes[i]], [str(n) for n in names[i]],
                           [float(p) for p in probabilities[i]]) for i in range(len(images))]

    def logits(self, images) -> Dict[str, Any]:
        """``serving_default`` on preprocessed images (float32 [N, size, size, 3]): logits and
        probabilities as numpy arrays."""
        import numpy as np
        import tensorflow as tf

        if self._onnx is not None:
            logits = self._onnx(np.asarray(images, dtype=np.float32))
            return {"logits": logits, "probabilities": _softmax(logits)}
        out = self._images(images=tf.convert_to_tensor(images, dtype=tf.float32))
        return {k: v.numpy() for k, v in out.items()}


def _softmax(logits):
    import numpy as np

    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)
