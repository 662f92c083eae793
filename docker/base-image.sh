#!/usr/bin/env bash
# Prints the name of a base image for docker/Dockerfile that this Docker engine has.
#
# $BASE_IMAGE (default python:3.11-slim) when the engine has it or can pull it; otherwise a local
# Debian bookworm image with python3 and python3-venv, built once with debootstrap from Debian's
# package mirror and `docker import`ed as $LOCAL_BASE_IMAGE (default expvault-base:bookworm).
# Needs root and debootstrap for that (docker/engine.sh installs it). Progress goes to stderr;
# stdout is the image name only. Exit 1 when no base image can be had.
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}"
LOCAL_BASE_IMAGE="${LOCAL_BASE_IMAGE:-expvault-base:bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PULL_TIMEOUT_S="${PULL_TIMEOUT_S:-60}"

log() { echo "base-image: $*" >&2; }

for image in "$BASE_IMAGE" "$LOCAL_BASE_IMAGE"; do
    if docker image inspect "$image" > /dev/null 2>&1; then
        echo "$image"
        exit 0
    fi
done
log "pulling $BASE_IMAGE (at most ${PULL_TIMEOUT_S} s)"
if timeout "$PULL_TIMEOUT_S" docker pull --quiet "$BASE_IMAGE" > /dev/null 2>&1; then
    echo "$BASE_IMAGE"
    exit 0
fi
log "$BASE_IMAGE cannot be pulled; building $LOCAL_BASE_IMAGE with debootstrap"
if [[ $(id -u) -ne 0 ]] || ! command -v debootstrap > /dev/null; then
    log "cannot build $LOCAL_BASE_IMAGE: needs root and debootstrap (apt-get install debootstrap)"
    exit 1
fi
rootfs="$(mktemp -d /var/tmp/expvault-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
started=$SECONDS
if ! debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" \
    "$DEBIAN_MIRROR" > "$rootfs.log" 2>&1; then
    tail -20 "$rootfs.log" >&2
    rm -f "$rootfs.log"
    log "debootstrap failed"
    exit 1
fi
rm -f "$rootfs.log"
# What an image needs no copy of: package caches and lists, documentation, locales.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log "$rootfs"/tmp/*
tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$LOCAL_BASE_IMAGE" > /dev/null
log "built $LOCAL_BASE_IMAGE in $((SECONDS - started)) s"
echo "$LOCAL_BASE_IMAGE"
