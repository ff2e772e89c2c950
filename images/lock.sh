#!/usr/bin/env bash
# Re-resolve the images' pinned requirements from pyproject.toml (run from anywhere; needs
# `uv`: pip install uv). Commit the results: the Dockerfiles install exactly these pins,
# so a build gets the same versions every time and a step needs no network at start.
set -euo pipefail
cd "$(dirname "$0")/.."
compile() {  # output python-version platform sources/extras...
    local out=$1 py=$2 platform=$3
    shift 3
    uv pip compile --quiet --no-annotate --generate-hashes --python-version "$py" --python-platform "$platform" \
        --custom-compile-command "images/lock.sh" -o "$out" "$@"
}
# cpu / gpu: TF 2.21 from the project's own extras, kfp and kfp-kubernetes as the compiler's, tf2onnx for
# the export step's model.onnx (not in the Ascend image: ATC takes the frozen graph), KServe for hrnet serve
# (nor that: it needs a newer Python than the Ascend image's 3.9).
compile images/cpu/requirements.txt 3.11 x86_64-manylinux_2_28 pyproject.toml --extra cpu --extra kfp --extra k8s --extra onnx --extra demo --extra serve
compile images/gpu/requirements.txt 3.11 x86_64-manylinux_2_28 pyproject.toml --extra gpu --extra kfp --extra k8s --extra onnx --extra demo --extra serve
# ascend: Python 3.9, TF 2.6.5 and an older kfp (see images/ascend/requirements.in).
compile images/ascend/requirements.txt 3.9 x86_64-manylinux_2_17 pyproject.toml images/ascend/requirements.in --extra k8s --extra demo
