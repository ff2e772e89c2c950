"""An exported model (the folder or URI ``hrnet export`` wrote) loaded for inference: what
``hrnet predict`` and ``hrnet serve`` share.

The export's ``classify_bytes`` signature decodes and preprocesses in the graph, exactly as
evaluation does, so a prediction here is the one ``hrnet evaluate`` counts. It decodes a
whole batch at once: a batch holding an image it cannot decode fails as a whole, and is then
classified one image at a time, so that only the bad image is reported.
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

    def __init__(self, uri: str):
        import tensorflow as tf

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
        log.info("loaded %s (%s, %d classes, %dx%d, version %d)", uri, manifest["model"], self.num_classes,
                 self.image_size, self.image_size, self.version)

    def classify(self, images: Sequence[bytes]) -> List[Union[Prediction, BadImage]]:
        """The top-k of each encoded image (JPEG, PNG, BMP, GIF), in order."""
        import tensorflow as tf

        if not images:
            return []
        try:
            out = self._classify(image_bytes=tf.constant(list(images), dtype=tf.string))
        except tf.errors.InvalidArgumentError as e:
            if len(images) == 1:
                return [BadImage(first_line(e))]
            return [r for image in images for r in self.classify([image])]
        classes, names, probabilities = (out["classes"].numpy(), out["names"].numpy(),
                                         out["probabilities"].numpy())
        return [Prediction([int(c) for c in classes[i]], [n.decode("utf-8") for n in names[i]],
                           [float(p) for p in probabilities[i]]) for i in range(len(images))]

    def logits(self, images) -> Dict[str, Any]:
        """``serving_default`` on preprocessed images (float32 [N, size, size, 3]): logits and
        probabilities as numpy arrays."""
        import tensorflow as tf

        out = self._images(images=tf.convert_to_tensor(images, dtype=tf.float32))
        return {k: v.numpy() for k, v in out.items()}
