"""Convert an image tree (ImageNet layout or class folders) to TFRecord shards, published
beside the run's artifacts (or at ``datasets_uri``); the Dataset artifact is a reference."""
from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import IMAGES


@dsl.component(base_image=IMAGES["cpu"], install_kfp_package=False)
def convert(source_uri: str, datasets_uri: str, dataset: Output[Dataset]):
    """TFRecords + labels.txt + manifest.json of ``source_uri`` (a folder or s3:// / minio:// URI)
    at ``datasets_uri``, or "" for a ``tfrecords`` prefix beside this step's artifact in the
    pipeline root; ``dataset`` holds only a reference to them (hrnet.data.reference), so the
    steps after this one fetch just the shards they read."""
    from hrnet import storage
    from hrnet.data.convert import convert_dataset
    from hrnet.data.reference import write_reference

    records = datasets_uri or storage.sibling(dataset.uri, "tfrecords")
    manifest = convert_dataset(source_uri, records)
    write_reference(dataset.path, records, manifest)
    # Shown beside the artifact in the KFP UI.
    dataset.metadata.update({key: manifest[key] for key in ("num_classes", "label_offset", "counts", "num_skipped")})
    dataset.metadata["records"] = records
