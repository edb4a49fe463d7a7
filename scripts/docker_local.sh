#!/usr/bin/env bash
# Builds privface's images (privface:latest, privface-postgres:local, privface-redis:local) on a machine that
# reaches Debian's and PyPI's mirrors but not Docker Hub or the PyTorch index, as this project's development
# machines (docs/docker.md). The base image is Debian bookworm made by debootstrap (its python3 is 3.11, the
# version the torch wheel on disk is built for); the wheel and the machine's CA bundle go in docker/local/.
# Idempotent: a second run reuses the base image and Docker's layer cache.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${PRIVFACE_DOCKER_BASE:-privface-base:bookworm}
MIRROR=${PRIVFACE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELS=${PRIVFACE_WHEEL_DIR:-/opt/wheels}

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { echo "error: debootstrap is missing (apt-get install debootstrap)" >&2; exit 2; }
  root=$(mktemp -d /var/tmp/privface-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  echo "building $BASE with debootstrap (a few minutes, once)" >&2
  debootstrap --variant=minbase --include=python3,python3-venv,libgl1,libglib2.0-0,ca-certificates \
    bookworm "$root" "$MIRROR" >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$BASE" >/dev/null
fi

args=(--network host --build-arg "BASE_IMAGE=$BASE")
wheel=$(ls "$WHEELS"/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$wheel" ]; then
  ln -f "$wheel" docker/local/ 2>/dev/null || cp -f "$wheel" docker/local/
  args+=(--build-arg "TORCH_REQUIREMENT=/tmp/local/$(basename "$wheel")" --build-arg "TORCH_INDEX_ARGS=")
fi
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}  # this machine's bundle holds its registry proxy's CA
if [ -n "$ca" ] && [ -f "$ca" ]; then
  cp -f "$ca" docker/local/ca.pem
  args+=(--build-arg PIP_CERT=/tmp/local/ca.pem)
fi

docker build -q "${args[@]}" -f docker/postgres.Dockerfile -t privface-postgres:local . >/dev/null
docker build -q "${args[@]}" -f docker/redis.Dockerfile -t privface-redis:local . >/dev/null
docker build "${args[@]}" -t privface:latest .
