#!/usr/bin/env bash
# Makes a Debian base image on a machine that cannot pull one (no registry): debootstrap
# --variant=minbase from Debian's packages, then `docker import`. With a registry, skip this and
# pass BASE_IMAGE=debian:bookworm-slim (or your own) to the Dockerfiles instead.
#
# Usage: deploy/images/base.sh [IMAGE]      prints the image name on stdout when done
#        (default kvcache-local/debian:bookworm)
# Env:   KVCACHE_CACHE_DIR (default /var/tmp/kvcache-cache): the root filesystem's tarball is
#        kept there, so a machine that keeps that directory but not Docker's images only imports.
#
# About 80 s and 40 MB of downloads from scratch; an image already there is kept as it is.
cd "$(dirname "$0")/../.."
. scripts/env.sh

IMAGE=${1:-kvcache-local/debian:bookworm}
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
TARBALL="$KVCACHE_CACHE_DIR/images/debian-$SUITE-minbase.tar"

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE"
    exit 0
fi
if [ ! -f "$TARBALL" ]; then
    ensure_packages debootstrap:debootstrap
    work=$(mktemp -d "${TMPDIR:-/var/tmp}/kvcache-base.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    echo "debootstrap --variant=minbase $SUITE (about a minute)" >&2
    as_root debootstrap --variant=minbase "$SUITE" "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
        { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    cat >"$work/rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
SOURCES
    # No downloaded packages or lists in the image; Dockerfiles run apt-get update first.
    as_root rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
    mkdir -p "$(dirname "$TARBALL")"
    as_root tar -C "$work/rootfs" -cf "$TARBALL.partial" .
    mv "$TARBALL.partial" "$TARBALL"
fi
docker import --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$TARBALL" "$IMAGE" >&2
echo "$IMAGE"
