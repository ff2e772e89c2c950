"""Object storage (s3:// and minio:// URIs) and local paths behind one small API.

Steps take URIs for their inputs and outputs and work on local paths:

    data_dir = storage.local_input(uri)          # a local copy, verified (cached)
    with storage.local_output(uri) as out_dir:   # written locally, published on exit
        ...
    storage.mirror(local_dir, uri)               # push new/changed files (checkpoints)
    storage.restore(uri, local_dir)              # pull what a previous pod left
    src_dir = storage.fetch(uri)                 # a plain bucket of files, as it is now

For local paths ``local_input`` / ``local_output`` return the path itself and ``mirror`` /
``restore`` are no-ops when both sides are the same folder. Besides these:
``exists``, ``list_files``, ``read_bytes`` / ``read_text``, ``write_bytes`` / ``write_text``,
``upload``, ``download`` and ``sync`` (folders). ``s3://bucket/prefix`` and
``minio://bucket/prefix`` (the scheme KFP uses for its artifacts) name the same store.

Guarantees:

- Every object carries its sha256 (user metadata ``x-amz-meta-sha256``); an upload is
  checked against size and checksum after it lands, a download is hashed as it streams and
  checked against the manifest entry (``{path, bytes, sha256}``) or the object's checksum.
  A sync skips files that are already present and equal.
- Atomic publish: an output counts as complete only when its manifest.json is present.
  An upload that changes anything under a prefix first removes the remote manifest.json,
  then uploads the files, then TF's ``checkpoint`` pointer, then manifest.json last.
  ``local_input`` refuses a prefix without manifest.json (``IncompleteError``) and reuses
  its local cache when the cache verifies against the manifest.
- The store is the truth: readers (``local_input``, ``fetch``) copy into a cache folder of
  their own, apart from the writers' working copies (``local_output``), so a read never
  deletes what a writer on the same machine has not published; files deleted in the store
  leave the readers' copies; an output emptied in the store starts afresh.
- Transient failures (connection errors, timeouts, HTTP 5xx, SlowDown / throttling) are
  retried with exponential backoff, bounded by a number of attempts and a total time;
  then the transfer fails with a ``StorageError``; a re-run skips what already landed.
- An output owns its prefix or folder (``local_output(uri, kind)``): a bare bucket is
  refused, so is a location holding anything but an output of the same kind (the owner
  marker ``.hrnet-output.json`` is written before any data); a publish deletes only what
  the output's previous manifest listed or this process transferred; a writer holds a
  lease (``Lease``) while it writes, so a second writer is refused.
- Errors are ``hrnet.errors.HrnetError`` subclasses that name the problem (unknown scheme,
  missing bucket, denied credentials, unreachable endpoint). No credential value appears
  in any message or log line.


The package's parts, in the order a request passes through them:

==============  =============================================================================
``uris``        URIs and local paths, the cache folder of a remote one, the bookkeeping names
``settings``    S3Settings, read from the environment below
``client``      the minio client and every request's retries (tenacity) and error translation
``objects``     one object, verified: checksums, put / get / head / list, progress (tqdm)
``folders``     folder sync and atomic publish (manifest.json last); the file API
``lease``       the writer's lease on an output
``publish``     what steps call: local_input, local_output, mirror, restore, claim_output
==============  =============================================================================

Environment (a Kubernetes Secret fills these in the cluster):

==============================  ===========================================================
``S3_ENDPOINT``                 ``http://host:port``, ``https://host`` or ``host:port``.
                                Also read, in this order: ``AWS_ENDPOINT_URL_S3``,
                                ``AWS_ENDPOINT_URL``, ``MINIO_ENDPOINT``. Default: AWS S3.
``S3_USE_TLS``                  ``true`` / ``false``; overrides the endpoint URL's scheme.
                                Without either, TLS is on.
``S3_VERIFY_TLS``               ``false`` skips certificate verification (self-signed
                                in-cluster MinIO); ``SSL_CERT_FILE`` names a CA bundle.
``AWS_REGION``                  Region (also ``AWS_DEFAULT_REGION``); when unset it is asked
                                from the server per bucket.
``AWS_ACCESS_KEY_ID``           Credentials, with ``AWS_SECRET_ACCESS_KEY`` and optional
                                ``AWS_SESSION_TOKEN``; else ``MINIO_ACCESS_KEY`` /
                                ``MINIO_SECRET_KEY``; none: anonymous requests.
``HRNET_S3_WORKERS``            Files transferred in parallel (8).
``HRNET_S3_PART_SIZE``          Multipart part size in bytes (64 MiB, at least 5 MiB);
                                larger files are uploaded in parts, 4 parts at a time.
``HRNET_S3_CONNECT_TIMEOUT``    Seconds to open a connection (5).
``HRNET_S3_READ_TIMEOUT``       Seconds to wait for data on an open connection (60).
``HRNET_S3_RETRIES``            Attempts per request before giving up (5).
``HRNET_S3_RETRY_DEADLINE``     Seconds after which no further attempt starts (120).
``HRNET_S3_BACKOFF``            First retry delay in seconds, doubled each retry (0.5).
``HRNET_CACHE_DIR``             Root of the local copies (``~/.cache/hrnet``).
``HRNET_LEASE_TTL``             Seconds a writer's lease on its output lasts unless renewed
                                (120); renewed every third of it.
``HRNET_RUN_ID``                The pipeline run (or any id) a writer belongs to: a lease left
                                by the same run id (a retried pod) is taken over at once.
==============================  ===========================================================
"""
from hrnet.errors import IncompleteError
from hrnet.storage.errors import (
    AccessDeniedError,
    BadUriError,
    BucketNotFoundError,
    ChangedError,
    ConfigError,
    EndpointUnreachableError,
    IntegrityError,
    LeaseHeldError,
    LeaseLostError,
    ObjectNotFoundError,
    OwnershipError,
    StorageError,
    TransferError,
)
from hrnet.storage.folders import (
    TransferStats,
    download,
    exists,
    get_object,
    list_files,
    list_names,
    read_bytes,
    read_text,
    sync,
    upload,
    write_bytes,
    write_text,
)
from hrnet.storage.lease import LEASE_TTL, Lease, add_force_argument
from hrnet.storage.publish import claim_output, fetch, local_input, local_output, mirror, restore
from hrnet.storage.settings import S3Settings, settings_from_env
from hrnet.storage.uris import (
    CONTROL_FILES,
    LEASE_CLAIMS,
    LEASE_FILE,
    OWNER_FILE,
    REMOTE_SCHEMES,
    cache_path,
    cache_root,
    is_control,
    is_remote,
    output_target,
    sibling,
    split_uri,
)

__all__ = [
    "AccessDeniedError", "BadUriError", "BucketNotFoundError", "ChangedError", "ConfigError",
    "EndpointUnreachableError", "IncompleteError", "IntegrityError", "LeaseHeldError", "LeaseLostError",
    "ObjectNotFoundError", "OwnershipError", "StorageError", "TransferError", "TransferStats", "download", "exists",
    "get_object", "list_files", "list_names", "read_bytes", "read_text", "sync", "upload", "write_bytes",
    "write_text", "LEASE_TTL",
    "Lease", "add_force_argument", "claim_output", "fetch", "local_input", "local_output", "mirror", "restore",
    "S3Settings", "settings_from_env", "CONTROL_FILES", "LEASE_CLAIMS", "LEASE_FILE", "OWNER_FILE", "REMOTE_SCHEMES",
    "cache_path", "cache_root", "is_control", "is_remote", "output_target", "sibling", "split_uri",
]
