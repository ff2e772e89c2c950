#!/usr/bin/env bash
# A Python base image made from Debian packages alone, for machines that reach a Debian mirror
# and a Python package index but no container registry (the images' FROM then needs no pull):
#
#   images/base/make-base.sh bookworm hrnet-base:bookworm    # Python 3.11: cpu and gpu images
#   images/base/make-base.sh bullseye hrnet-base:bullseye    # Python 3.9: a stand-in for the CANN
#                                                            # base of the Ascend image's Python layer
#
# debootstrap (minbase, plus python3, its venv module and CA certificates) from the mirror this
# machine's apt uses; then this machine's apt sources, extra CA certificates and pip
# configuration go in, so that apt and pip inside a build work exactly as they do here; a
# virtual environment /opt/venv first on PATH, since Debian's own Python refuses pip installs;
# then `docker import` (or podman's: CONTAINER_TOOL=podman). About 3 minutes and 200 MB.
# Needs root (debootstrap), and does nothing when the image exists already (FORCE=1 remakes it).
set -euo pipefail
suite=${1:?usage: make-base.sh SUITE IMAGE (SUITE: bookworm or bullseye)}
image=${2:?usage: make-base.sh SUITE IMAGE}
tool=${CONTAINER_TOOL:-docker}

case "$suite" in
  bookworm) python=python3.11 ;;
  bullseye) python=python3.9 ;;
  *) echo "make-base.sh: suite $suite: use bookworm (Python 3.11) or bullseye (Python 3.9)" >&2; exit 2 ;;
esac
if [ -z "${FORCE:-}" ] && "$tool" image inspect "$image" > /dev/null 2>&1; then
  echo "make-base.sh: $image exists (FORCE=1 makes it again)"
  exit 0
fi
if ! command -v debootstrap > /dev/null; then
  [ "$(id -u)" = 0 ] || { echo "make-base.sh: needs debootstrap (apt-get install debootstrap) and root" >&2; exit 2; }
  echo "make-base.sh: installing debootstrap"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap > /dev/null
fi

# The mirror apt here uses: the first Debian (not security) URI of the active sources, in the
# deb822 or the one-line format.
sources=$(ls /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null || true)
mirror=$(cat $sources /dev/null | grep -oE '^(URIs:[[:space:]]*|deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)https?://[^[:space:]]+' \
           | grep -oE 'https?://[^[:space:]]+' | grep -v security | grep -E '/debian/?$' | head -n 1 || true)
[ -n "$mirror" ] || { echo "make-base.sh: no Debian mirror found in /etc/apt/sources.list*" >&2; exit 2; }

root=$(mktemp -d "${TMPDIR:-/tmp}/hrnet-base-$suite.XXXXXX")
trap 'rm -rf "$root"' EXIT
echo "make-base.sh: debootstrap $suite from $mirror into $root"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$suite" "$root" "$mirror" \
  > "$root.log" 2>&1 || { tail -n 20 "$root.log" >&2; exit 1; }
rm -f "$root.log"

# This machine's extra CA certificates (a proxy's, a private index's) and pip configuration.
if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates > /dev/null
fi
for f in /etc/pip.conf /etc/xdg/pip/pip.conf /etc/xdg/pip/constraints.txt; do
  if [ -f "$f" ]; then mkdir -p "$root$(dirname "$f")" && cp "$f" "$root$f"; fi
done
# apt inside the image: the same sources as here (the bookworm or bullseye suite names swapped).
rm -f "$root/etc/apt/sources.list"
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
  sed -E "s/\bbookworm\b/$suite/g" /etc/apt/sources.list.d/debian.sources > "$root/etc/apt/sources.list.d/debian.sources"
else
  echo "deb $mirror $suite main" > "$root/etc/apt/sources.list"
fi
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin

chroot "$root" "$python" -m venv /opt/venv
chroot "$root" /opt/venv/bin/python -m pip --version > /dev/null

tar -C "$root" -c . | "$tool" import \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$image" > /dev/null
echo "make-base.sh: made $image ($("$tool" image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}'), $python)"
