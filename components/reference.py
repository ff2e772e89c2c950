"""Records converted before (``tfrecords_uri``) as the run's Dataset: a reference to them."""
from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import IMAGES


@dsl.component(base_image=IMAGES["cpu"], install_kfp_package=False)
def reference_records(tfrecords_uri: str, dataset: Output[Dataset]):
    """``dataset``: a reference to the records at ``tfrecords_uri`` (ours or slim's), checked
    to be complete by their manifest where they have one. Unlike KFP's importer this copies
    nothing: the steps after it fetch only the shards they read."""
    from hrnet.data.reference import refer

    refer(tfrecords_uri, dataset.path)
    dataset.metadata["records"] = tfrecords_uri
