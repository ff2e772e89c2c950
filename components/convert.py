"""Convert an image tree (ImageNet layout or class folders) to TFRecord shards."""
from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import IMAGES


@dsl.component(base_image=IMAGES["cpu"], install_kfp_package=False)
def convert(source_uri: str, dataset: Output[Dataset]):
    """TFRecords + labels.txt + manifest.json of ``source_uri`` (a folder or s3:// / minio:// URI)."""
    from hrnet.data.convert import convert_dataset

    manifest = convert_dataset(source_uri, dataset.path)
    # Shown beside the artifact in the KFP UI.
    dataset.metadata.update({key: manifest[key] for key in ("num_classes", "label_offset", "counts", "num_skipped")})
