"""Records converted before (``tfrecords_uri``) as the run's Dataset: a reference to them."""
from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import IMAGES


@dsl.component(base_image=IMAGES["cpu"], install_kfp_package=False)
def reference_records(tfrecords_uri: str, dataset: Output[Dataset]):
    """``dataset``: a reference to the records at ``tfrecords_uri`` (ours or slim's), checked
    to be complete by their manifest where they have one. Unlike KFP's importer this copies
    nothing: the steps after it fetch only the shards they read."""
    import json

    from hrnet import storage
    from hrnet.data.reference import write_reference
    from hrnet.manifest import MANIFEST

    manifest = None
    if storage.exists(tfrecords_uri.rstrip("/") + "/" + MANIFEST):
        manifest = json.loads(storage.read_text(tfrecords_uri.rstrip("/") + "/" + MANIFEST))
        if manifest.get("kind") != "tfrecords":
            raise ValueError(f"{tfrecords_uri} holds a {manifest.get('kind')!r} output, not TFRecords")
    elif not storage.exists(tfrecords_uri):
        raise ValueError(f"tfrecords_uri {tfrecords_uri}: there is nothing there")
    write_reference(dataset.path, tfrecords_uri, manifest)
    dataset.metadata["records"] = tfrecords_uri
