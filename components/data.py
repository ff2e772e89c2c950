"""The run's data set: an image tree converted to TFRecord shards, or TFRecords converted
before taken as they are. One step either way, so that everything after it has one input to
take (a pipeline cannot merge the artifacts of two branches in KFP's local runner)."""
from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import IMAGES


@dsl.component(base_image=IMAGES["cpu"], install_kfp_package=False)
def prepare_data(source: str, source_uri: str, tfrecords_uri: str, datasets_uri: str, dataset: Output[Dataset]):
    """``source``: the validate step's choice. "tfrecords": ``dataset`` refers to the records at
    ``tfrecords_uri`` (ours or slim's), checked to be complete by their manifest where they
    have one; nothing is copied. "convert": TFRecords + labels.txt + manifest.json of
    ``source_uri`` (a folder or s3:// / minio:// URI) are written at ``datasets_uri``, or "" for
    a ``tfrecords`` prefix beside this step's artifact in the pipeline root. Either way
    ``dataset`` holds only a reference (hrnet.data.reference), so the steps after this one
    fetch just the shards they read."""
    from hrnet import storage
    from hrnet.data.reference import refer, write_reference

    if source == "tfrecords":
        refer(tfrecords_uri, dataset.path)
        dataset.metadata["records"] = tfrecords_uri
        return
    from hrnet.data.convert import convert_dataset

    records = datasets_uri or storage.sibling(dataset.uri, "tfrecords")
    manifest = convert_dataset(source_uri, records)
    write_reference(dataset.path, records, manifest)
    # Shown beside the artifact in the KFP UI.
    dataset.metadata.update({key: manifest[key] for key in ("num_classes", "label_offset", "counts", "num_skipped")})
    dataset.metadata["records"] = records
