#!/usr/bin/env bash
# Builds the expvault image: wheels on the host, then `docker build` with no network inside.
#
#   bash docker/build.sh [TAG]          # default TAG: $EXPVAULT_IMAGE or expvault:latest
#
# 1. docker/wheelhouse/: wheels of every dependency of the checkout (and setuptools for building
#    it), made by the host's pip (PIP=... picks which; default .venv/bin/pip, else pip3), which
#    reaches the package index or its cache. The Dockerfile installs from there with
#    --no-index.
# 2. The base image: $BASE_IMAGE when the engine has it or can pull it, else a local Debian
#    image (docker/base-image.sh).
# 3. docker build -f docker/Dockerfile with the repository as context (.dockerignore trims it).
set -euo pipefail
cd "$(dirname "$0")/.."

tag="${1:-${EXPVAULT_IMAGE:-expvault:latest}}"
if [[ -z "${PIP:-}" ]]; then
    if [[ -x .venv/bin/pip ]]; then PIP=.venv/bin/pip; else PIP=pip3; fi
fi
started=$SECONDS
# The project itself is built inside the image from the sources; only its dependencies here.
"$PIP" wheel --quiet --disable-pip-version-check --wheel-dir docker/wheelhouse . "setuptools>=68"
rm -f docker/wheelhouse/expvault-*.whl
echo "build: wheelhouse ready in $((SECONDS - started)) s" >&2
base="$(bash docker/base-image.sh)"
echo "build: base image $base" >&2
docker build --file docker/Dockerfile --tag "$tag" --build-arg "BASE_IMAGE=$base" . >&2
echo "build: $tag built in $((SECONDS - started)) s" >&2
echo "$tag"
