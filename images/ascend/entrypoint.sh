#!/bin/bash
# The Ascend image's entrypoint (/usr/local/bin/hrnet-ascend-env): source the CANN
# environment, then run the command given, e.g.  hrnet-ascend-env hrnet launch --nproc 8 ...
#
# The set_env.sh files of the toolkit (or nnae) and of the TF adapter set PATH, PYTHONPATH,
# LD_LIBRARY_PATH and ASCEND_* for the CANN release in the image; the driver's libraries come
# from the host, mounted by the Ascend Docker runtime. The image's `python3` is a two-line
# script that runs this too: KFP replaces the entrypoint with its launcher, which then starts
# `python3`, so a KFP step gets the same environment as `docker run` or a Kubernetes Job.
if [ -z "${HRNET_ASCEND_ENV:-}" ]; then
    found=""
    IFS=: read -r -a set_env_files <<< "${ASCEND_SET_ENV_FILES:-}"
    for f in "${set_env_files[@]}"; do
        if [ -f "$f" ]; then
            # shellcheck disable=SC1090
            . "$f" || echo "hrnet-ascend-env: warning: sourcing $f failed" >&2
            found="$found $f"
        fi
    done
    for d in /usr/local/Ascend/driver/lib64 /usr/local/Ascend/driver/lib64/common /usr/local/Ascend/driver/lib64/driver; do
        if [ -d "$d" ]; then
            LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        fi
    done
    export LD_LIBRARY_PATH
    if [ -z "$found" ]; then
        echo "hrnet-ascend-env: warning: none of the CANN set_env.sh files exists" \
             "(ASCEND_SET_ENV_FILES=${ASCEND_SET_ENV_FILES:-}); --device npu will not work" >&2
    fi
    # Nested calls (python3 started by a step that already has the environment) skip this.
    export HRNET_ASCEND_ENV=1
fi
if [ "$#" -eq 0 ]; then
    set -- hrnet --help
fi
exec "$@"
