#!/usr/bin/env bash
# Makes every container image the container tests need, idempotently, with nothing pulled
# (this engine has no registry):
#   s3cached-test/debian:bookworm  Debian bookworm (minbase, ca-certificates) by debootstrap,
#                                  imported with `docker import`: stands in for
#                                  debian:bookworm-slim and, with PREBUILT, for the Rust image
#   s3cached-test/moto             moto on that base, the S3 server in MinIO's place
#   s3cached:local                 the repository's Dockerfile, packaging a binary built
#                                  outside (PREBUILT, default target/debug/s3cached)
# Exits 3 after one line when no Docker engine answers.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=tests/containers

BASE=s3cached-test/debian:bookworm
MOTO=s3cached-test/moto
APP=s3cached:local
PREBUILT=${PREBUILT:-target/debug/s3cached}

if ! docker info >/dev/null 2>&1; then
  echo "images: no Docker engine answers (docker info failed); no image made"
  exit 3
fi
has_image() { docker image inspect "$1" >/dev/null 2>&1; }

# The base: debootstrap from Debian's mirror (debootstrap's default; DEBIAN_MIRROR overrides),
# trimmed as Debian's bookworm-slim image is: apt keeps no package caches, dpkg installs no
# documentation or translations. BASE_RECIPE changes when this recipe does.
BASE_RECIPE=2
base_recipe() { docker image inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$BASE" 2>/dev/null | sed -n 's/^S3CACHED_TEST_BASE_RECIPE=//p'; }
if [ "$(base_recipe)" != "$BASE_RECIPE" ]; then
  command -v debootstrap >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  echo "images: debootstrap bookworm into $root"
  # shellcheck disable=SC2086 # an unset mirror is no argument
  debootstrap --variant=minbase --include=ca-certificates bookworm "$root" ${DEBIAN_MIRROR:-} >"$root.log" 2>&1 \
    || { tail -n 20 "$root.log" >&2; exit 1; }
  rm -f "$root.log"
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
DPKG
  find "$root/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
    "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' \
    --change "ENV S3CACHED_TEST_BASE_RECIPE=$BASE_RECIPE" - "$BASE" >/dev/null
  rm -rf "$root"
  trap - EXIT
fi

# moto: its wheels are fetched here on the host (whose trust store the package index needs)
# and installed offline in the image. Rebuilt when its recipe or tests/s3server.py changes.
moto_recipe=$(cat "$here/moto.Dockerfile" tests/s3server.py | sha1sum | cut -c1-16)
if [ "$(docker image inspect -f '{{index .Config.Labels "recipe"}}' "$MOTO" 2>/dev/null)" != "$moto_recipe" ]; then
  ctx=$(mktemp -d)
  trap 'rm -rf "$ctx"' EXIT
  python3 -m pip download -q --disable-pip-version-check -d "$ctx/wheels" \
    --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
    'moto[s3,server]>=5.2.5'
  cp tests/s3server.py "$ctx/"
  docker build -q -f "$here/moto.Dockerfile" --build-arg BASE="$BASE" \
    --label recipe="$moto_recipe" -t "$MOTO" "$ctx" >/dev/null
  rm -rf "$ctx"
  trap - EXIT
fi

# s3cached: the Dockerfile users build, its runtime stage unchanged, the binary packaged.
[ -x "$PREBUILT" ] || { echo "images: no binary at $PREBUILT (cargo build --bins)" >&2; exit 1; }
docker build -q --build-arg PREBUILT="$PREBUILT" --build-arg RUST_IMAGE="$BASE" \
  --build-arg RUNTIME_IMAGE="$BASE" -t "$APP" . >/dev/null
echo "images: $BASE, $MOTO, $APP ($(docker image inspect -f '{{.Size}}' "$APP" | numfmt --to=iec))"
