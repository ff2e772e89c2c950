"""What can go wrong with a store, as errors that name the problem (all HrnetError)."""
from hrnet.errors import HrnetError


class StorageError(HrnetError):
    """An object-storage operation failed; the message says which and why."""


class BadUriError(StorageError, ValueError):
    """A URI that is not s3://bucket/prefix, minio://bucket/prefix or a local path."""


class ConfigError(StorageError):
    """The S3 environment variables are wrong (endpoint, TLS, region, part size...)."""


class BucketNotFoundError(StorageError):
    """The bucket named in a URI does not exist on the endpoint."""


class AccessDeniedError(StorageError):
    """The store refused the credentials, or they do not grant access."""


class EndpointUnreachableError(StorageError):
    """No connection to the endpoint could be opened within the retry budget."""


class TransferError(StorageError):
    """A transfer kept failing with transient errors until the retry budget ran out."""


class IntegrityError(StorageError):
    """An object or local file does not match its recorded size and sha256."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """No object (and no folder) at the URI."""


class ChangedError(StorageError):
    """An object changed between listing and reading it: someone is writing the prefix."""


class OwnershipError(StorageError):
    """An output location that holds something this step did not write (or another kind of
    output): writing there could destroy it, so the step refuses."""


class LeaseHeldError(StorageError):
    """Another writer holds the lease on an output."""


class LeaseLostError(StorageError):
    """This writer's lease on its output expired or was taken over while it worked."""


class Mismatch(Exception):
    """Retried once more before it becomes an IntegrityError (a torn transfer)."""
