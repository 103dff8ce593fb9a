#!/usr/bin/env bash
# compose/base-image.sh - build the base image debian:trixie-slim locally with debootstrap, for
# when it cannot be pulled (an offline machine, no registry). Every image of the stack is built
# FROM it. `make up` runs this only after a pull failed (compose/baseimage.py decides and says
# which happened); CI (.ci/install-docker.sh) runs it directly: no registry is reachable there.
#
#   sudo bash compose/base-image.sh [--tag debian:trixie-slim] [--refresh]
#   bash compose/base-image.sh --print-mirror       the Debian mirror it would use, then exit
#
# Needs root (debootstrap does) and installs debootstrap and debian-archive-keyring if missing.
# The Debian mirror is the host's own (from its apt sources), never hard-coded; the rootfs is
# cached as a tarball under /var/cache/pool-ci/, so a re-import (another tag, a new storage
# driver) takes seconds. Environment (all optional):
#   POOL_CI_DEBIAN_MIRROR     mirror URI for trixie (default: the host's apt URI for its own codename)
#   POOL_CI_SECURITY_MIRROR   security mirror URI (default: host's URI for <codename>-security; "none" to skip)
#   BASE_IMAGE_CACHE_DIR      where the rootfs tarball is cached (default /var/cache/pool-ci)
set -euo pipefail

SECONDS=0
BASE_IMAGE=debian:trixie-slim
BASE_SUITE=trixie
CACHE_DIR=${BASE_IMAGE_CACHE_DIR:-/var/cache/pool-ci}
ROOTFS_TAR=$CACHE_DIR/debian-$BASE_SUITE-minbase-rootfs.tar.gz
ROOTFS_META=$ROOTFS_TAR.meta
# .ci/install-docker.sh's own trixie source (for Compose v2); never taken for the mirror.
TRIXIE_SOURCES=/etc/apt/sources.list.d/pool-ci-trixie.sources
DOCKER=${DOCKER:-docker}
REFRESH=0
PRINT_MIRROR=0
export DEBIAN_FRONTEND=noninteractive

log() { printf '[base-image %3ss] %s\n' "$SECONDS" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

while [ $# -gt 0 ]; do
    case $1 in
    --tag) BASE_IMAGE=${2:?--tag needs an image name}; shift 2 ;;
    --refresh) REFRESH=1; shift ;;
    --print-mirror) PRINT_MIRROR=1; shift ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done

# apt_uri_for_suite SUITE: first enabled "deb" URI in the host's apt sources serving SUITE
# (deb822 *.sources and one-line *.list; our own trixie file is ignored).
apt_uri_for_suite() {
    local suite=$1 f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        if [ ! -f "$f" ] || [ "$f" = "$TRIXIE_SOURCES" ]; then continue; fi
        case $f in
        *.sources)
            awk -v want="$suite" '
                function flush() {
                    if (types ~ /(^| )deb( |$)/ && enabled !~ /^(no|false)$/ && uris != "") {
                        n = split(suites, s, " ")
                        for (i = 1; i <= n; i++) if (s[i] == want) { split(uris, u, " "); print u[1]; found = 1; exit }
                    }
                    types = uris = suites = enabled = ""
                }
                /^[ \t]*$/ { flush(); next }
                /^#/ { next }
                /^Types:/   { sub(/^Types:[ \t]*/, "");   types = $0 }
                /^URIs:/    { sub(/^URIs:[ \t]*/, "");    uris = $0 }
                /^Suites:/  { sub(/^Suites:[ \t]*/, "");  suites = $0 }
                /^Enabled:/ { sub(/^Enabled:[ \t]*/, ""); enabled = tolower($0) }
                END { if (!found) flush() }' "$f"
            ;;
        *)
            sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" | awk -v want="$suite" '$1 == "deb" && $3 == want { print $2; exit }'
            ;;
        esac
    done | head -n1 | sed 's:/*$::'
}

# shellcheck disable=SC1091
HOST_CODENAME=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
debian_mirror() {
    local m=${POOL_CI_DEBIAN_MIRROR:-}
    [ -n "$m" ] || { [ -n "$HOST_CODENAME" ] && m=$(apt_uri_for_suite "$HOST_CODENAME"); }
    [ -n "$m" ] || die "cannot derive the Debian mirror from /etc/apt/sources*; set POOL_CI_DEBIAN_MIRROR"
    echo "${m%/}"
}
security_mirror() {
    local m=${POOL_CI_SECURITY_MIRROR:-}
    [ "$m" = none ] && return 0
    [ -n "$m" ] || { [ -n "$HOST_CODENAME" ] && m=$(apt_uri_for_suite "$HOST_CODENAME-security"); }
    echo "${m%/}"
}

if [ "$PRINT_MIRROR" = 1 ]; then
    debian_mirror
    exit 0
fi
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap needs it): sudo bash $0 $*"
mkdir -p "$CACHE_DIR"
missing=()
for p in debootstrap debian-archive-keyring; do is_installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
fi

build_rootfs_tarball() {
    local mirror security dir
    mirror=$(debian_mirror)
    security=$(security_mirror)
    dir=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
    # shellcheck disable=SC2064
    trap "cleanup_rootfs '$dir'" EXIT
    log "debootstrap --variant=minbase $BASE_SUITE from $mirror (about 30s)"
    # Progress: debootstrap's latest step every 10 s (its full output goes to the log).
    debootstrap --variant=minbase "$BASE_SUITE" "$dir" "$mirror" >"$CACHE_DIR/debootstrap.log" 2>&1 &
    local pid=$! rc=0
    while kill -0 "$pid" 2>/dev/null; do
        sleep 10 & wait $! || true
        kill -0 "$pid" 2>/dev/null && log "debootstrap: $(grep '^I: ' "$CACHE_DIR/debootstrap.log" | tail -n1 | cut -c4-80)"
    done
    wait "$pid" || rc=$?
    if [ "$rc" -ne 0 ]; then
        tail -n 20 "$CACHE_DIR/debootstrap.log" >&2
        die "debootstrap failed (full log: $CACHE_DIR/debootstrap.log)"
    fi

    log "trimming rootfs (slim: no docs/man/locales, empty apt lists/caches)"
    # apt sources in deb822 form, same mirror as the host, plus updates and security.
    rm -f "$dir/etc/apt/sources.list"
    {
        printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$mirror" "$BASE_SUITE" "$BASE_SUITE"
        if [ -n "$security" ]; then
            printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
                "$security" "$BASE_SUITE"
        fi
    } >"$dir/etc/apt/sources.list.d/debian.sources"
    # Same minimising config as the official slim images.
    cat >"$dir/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
EOF
    cat >"$dir/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    printf 'Acquire::Languages "none";\n' >"$dir/etc/apt/apt.conf.d/docker-no-languages"
    printf 'Acquire::GzipIndexes "true";\n' >"$dir/etc/apt/apt.conf.d/docker-gzip-indexes"
    printf 'APT::AutoRemove::SuggestsImportant "false";\n' >"$dir/etc/apt/apt.conf.d/docker-autoremove-suggests"
    printf '#!/bin/sh\nexit 101\n' >"$dir/usr/sbin/policy-rc.d" && chmod 755 "$dir/usr/sbin/policy-rc.d"
    find "$dir/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
    find "$dir/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
    find "$dir/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} + 2>/dev/null || true
    case $dir in "$CACHE_DIR"/rootfs.*) ;; *) die "refusing to trim rootfs '$dir'" ;; esac
    rm -rf "${dir:?}"/usr/share/{man,groff,info,lintian,linda}/* \
        "${dir:?}"/var/lib/apt/lists/* "${dir:?}"/var/cache/apt/archives/*.deb "${dir:?}"/var/cache/apt/*.bin \
        "${dir:?}"/var/log/*.log "${dir:?}"/var/log/apt/* "${dir:?}"/tmp/* "${dir:?}"/dev/* "${dir:?}"/run/*
    : >"$dir/etc/resolv.conf"   # docker bind-mounts these at run time
    : >"$dir/etc/hostname"

    log "packing rootfs into $ROOTFS_TAR"
    local gz=gzip
    command -v pigz >/dev/null && gz=pigz
    tar --numeric-owner --xattrs -C "$dir" -c . | $gz -1 >"$ROOTFS_TAR.tmp"
    mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
    printf 'suite=%s\nmirror=%s\nsecurity=%s\nbuilt=%s\n' "$BASE_SUITE" "$mirror" "$security" "$(date -Is)" >"$ROOTFS_META"
    cleanup_rootfs "$dir"
    trap - EXIT
}

cleanup_rootfs() { # unmount anything debootstrap left mounted, then remove the tree
    local dir=$1 m
    [ -d "$dir" ] || return 0
    for m in $(findmnt -rn -o TARGET | grep -F "$dir/" | sort -r); do umount -l "$m" 2>/dev/null || true; done
    rm -rf --one-file-system "$dir"
    rm -f "$ROOTFS_TAR.tmp"
}

tarball_current() {
    [ -s "$ROOTFS_TAR" ] && [ -f "$ROOTFS_META" ] || return 1
    grep -qxF "mirror=$(debian_mirror)" "$ROOTFS_META"
}

import_base_image() {
    if [ "$REFRESH" = 1 ]; then
        rm -f "$ROOTFS_TAR" "$ROOTFS_META"
    fi
    if tarball_current; then
        log "using cached rootfs $ROOTFS_TAR ($(grep ^built= "$ROOTFS_META" | cut -d= -f2))"
    else
        build_rootfs_tarball
    fi
    log "docker import -> $BASE_IMAGE"
    "$DOCKER" import --change 'CMD ["bash"]' \
        --message "debootstrap --variant=minbase $BASE_SUITE (compose/base-image.sh)" \
        "$ROOTFS_TAR" "$BASE_IMAGE" >/dev/null || die "docker import failed"
}

import_base_image
log "$BASE_IMAGE built locally with debootstrap and imported (${SECONDS}s)"
