"""Export a checkpoint for serving (SavedModel) and for Ascend ATC (frozen graph)."""
from kfp import dsl
from kfp.dsl import Input, Model, Output

from components.images import IMAGES


@dsl.component(base_image=IMAGES["cpu"], install_kfp_package=False)
def export(model: Input[Model], exported: Output[Model], onnx: bool):
    """The training run's best weights by validation top-1 (its last when it did not
    validate): the SavedModel in 1/ (so ``exported``'s URI is a KServe storageUri), frozen/
    (.pb, node names, the atc command), model.onnx if asked for, and manifest.json."""
    from hrnet.export import export_model

    manifest = export_model(model.path, exported.path, onnx=onnx)
    exported.metadata.update({"formats": sorted(k for k in ("saved_model", "frozen", "onnx") if k in manifest),
                              "weights": manifest["weights"], "step": manifest["step"],
                              "storage_uri": exported.uri})
