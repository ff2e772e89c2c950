#!/usr/bin/env bash
# Run a command with a Docker engine: the one that answers already, or dockerd started here
# (installed from Debian's docker.io when missing; root only) and stopped when the command ends.
#   images/with-docker.sh make images-local
set -euo pipefail
if docker info > /dev/null 2>&1; then
  exec "$@"
fi
if [ "$(id -u)" != 0 ]; then
  echo "with-docker.sh: no Docker engine answers, and only root may start one here" >&2
  exit 2
fi
if ! command -v dockerd > /dev/null; then
  echo "with-docker.sh: installing docker.io (Debian's Docker engine)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io > /dev/null
fi
log=$(mktemp "${TMPDIR:-/tmp}/dockerd.XXXXXX.log")
dockerd > "$log" 2>&1 &
pid=$!
stop() { kill "$pid" 2> /dev/null && wait "$pid" 2> /dev/null; rm -f "$log"; }
trap stop EXIT
for _ in $(seq 1 60); do
  docker info > /dev/null 2>&1 && break
  kill -0 "$pid" 2> /dev/null || { cat "$log" >&2; exit 1; }
  sleep 1
done
docker info > /dev/null 2>&1 || { echo "with-docker.sh: dockerd did not answer within 60 s" >&2; cat "$log" >&2; exit 1; }
"$@"
