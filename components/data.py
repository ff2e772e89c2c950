"""The run's data set: an image tree converted to TFRecord shards, or TFRecords converted
before taken as they are, whichever ``data_uri`` holds. One step either way, so that
everything after it has one input to take (a pipeline cannot merge the artifacts of two
branches in KFP's local runner)."""
from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import IMAGES


@dsl.component(base_image=IMAGES["cpu"], install_kfp_package=False)
def prepare_data(data_uri: str, datasets_uri: str, dataset: Output[Dataset]):
    """``dataset`` refers to the TFRecords at ``data_uri`` (ours or slim's) as they are, or to
    the records its image tree is converted to at ``datasets_uri`` ("": a ``tfrecords`` prefix
    beside this step's artifact in the pipeline root); hrnet.data.reference.prepare finds
    which. Either way ``dataset`` holds only a reference, so the steps after this one fetch
    just the shards they read."""
    from hrnet.data.reference import prepare

    # Shown beside the artifact in the KFP UI.
    dataset.metadata.update(prepare(data_uri, dataset.path, dataset.uri, datasets_uri))
