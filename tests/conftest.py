import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Before any test module imports TensorFlow: hrnet turns oneDNN on as it does for its users.
import hrnet  # noqa: E402, F401, I001

# The S3 test server fixtures (s3_server, s3_env) for every test module: see tests/s3server.py.
from s3server import both_servers, moto_server, s3_env, s3_server, seaweedfs_server  # noqa: E402, F401
