#!/usr/bin/env bash
# .ci/install-docker.sh - idempotent Docker setup for CI on a Debian host (owner: docker-infra).
#
# Leaves the machine with:
#   1. a Docker engine (Debian's docker.io unless an engine/dockerd already exists) + debootstrap;
#   2. Compose v2 (`docker compose`), from Debian trixie via a priority-100 pinned apt source
#      when the host's own suites only have Compose v1;
#   3. dockerd running in the background (log: /var/log/dockerd.log) if no engine answered;
#   4. the image debian:trixie-slim built locally with debootstrap by compose/base-image.sh (no
#      container registry is used; the rootfs tarball is cached under /var/cache/pool-ci/ so
#      reruns are fast);
#   5. a one-line summary on stdout.
# Every step checks first and does nothing if already done, so reruns take a few seconds.
#
# The Debian mirror is taken from the host's apt sources, never hard-coded.
# Environment overrides (all optional):
#   POOL_CI_DEBIAN_MIRROR     mirror URI for trixie (default: the host's apt URI for its own codename)
#   POOL_CI_SECURITY_MIRROR   security mirror URI (default: host's URI for <codename>-security; "none" to skip)
#   POOL_CI_STORAGE_DRIVER    force a dockerd storage driver (e.g. vfs); default: dockerd's choice,
#                             with automatic fallback to vfs if overlay2 cannot run containers
#   POOL_CI_DOCKER_DNS        DNS server(s) for containers (space-separated), if the host only has a
#                             loopback resolver that containers cannot reach
#   POOL_CI_DOCKERD_TIMEOUT   seconds to wait for dockerd to answer (default 60)
#   POOL_CI_REFRESH_BASE=1    rebuild the rootfs tarball and re-import debian:trixie-slim
set -euo pipefail

SECONDS=0
BASE_IMAGE=debian:trixie-slim
BASE_SUITE=trixie
CACHE_DIR=/var/cache/pool-ci
DRIVER_STATE=$CACHE_DIR/dockerd-storage-driver
DOCKERD_LOG=/var/log/dockerd.log
DOCKERD_TIMEOUT=${POOL_CI_DOCKERD_TIMEOUT:-60}
TRIXIE_SOURCES=/etc/apt/sources.list.d/pool-ci-trixie.sources
TRIXIE_PIN=/etc/apt/preferences.d/pool-ci-trixie
export DEBIAN_FRONTEND=noninteractive

log() { printf '[install-docker %3ss] %s\n' "$SECONDS" "$*" >&2; }
warn() { log "WARNING: $*"; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
mkdir -p "$CACHE_DIR"

# ---------------------------------------------------------------- helpers: apt
APT_UPDATED=0
apt_update() {
    if [ "$APT_UPDATED" -eq 0 ] || [ "${1:-}" = force ]; then
        log "apt-get update"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
}
is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

# write_if_changed FILE CONTENT -> returns 0 if the file was (re)written
write_if_changed() {
    if [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; then return 1; fi
    printf '%s\n' "$2" >"$1.tmp.$$" && mv "$1.tmp.$$" "$1"
}

# The Debian mirror (from the host's apt sources; POOL_CI_DEBIAN_MIRROR overrides) and the
# base image build live in compose/base-image.sh, which `make up` also uses.
BASE_IMAGE_SH=$(cd "$(dirname "$0")/.." && pwd)/compose/base-image.sh
debian_mirror() { bash "$BASE_IMAGE_SH" --print-mirror; }

# ---------------------------------------------------------------- helpers: docker client
# Prefer the `docker` on PATH (e.g. a newer CLI in /usr/local/bin; it negotiates the API version
# down, 28.x -> 1.41 against engine 20.10). If it cannot talk to the engine, fall back to the CLI
# shipped with the engine (/usr/bin/docker), then to pinning DOCKER_API_VERSION.
DOCKER=$(command -v docker || true)
engine_answers() { [ -n "$DOCKER" ] && "$DOCKER" info >/dev/null 2>&1; }

pick_docker_client() {
    local out api
    if out=$("$DOCKER" version --format '{{.Server.Version}}' 2>&1) && [ -n "$out" ]; then return 0; fi
    if [ -x /usr/bin/docker ] && [ "$DOCKER" != /usr/bin/docker ] &&
        /usr/bin/docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
        warn "$DOCKER cannot talk to the engine ($out); using /usr/bin/docker. Put /usr/bin first in PATH for later steps."
        DOCKER=/usr/bin/docker
        return 0
    fi
    api=$(printf '%s' "$out" | grep -oE 'Maximum supported API version is [0-9.]+' | grep -oE '[0-9.]+$' || true)
    if [ -n "$api" ] && DOCKER_API_VERSION=$api "$DOCKER" version >/dev/null 2>&1; then
        export DOCKER_API_VERSION=$api
        warn "engine only speaks API $api; export DOCKER_API_VERSION=$api for later steps"
        return 0
    fi
    die "docker client $DOCKER cannot talk to the engine: $out"
}

compose_version() { # prints the Compose version if `docker compose` is v2+, else fails
    local v
    [ -n "$DOCKER" ] || return 1
    v=$("$DOCKER" compose version --short 2>/dev/null) || return 1
    v=${v#v}
    [ "${v%%.*}" -ge 2 ] 2>/dev/null || return 1
    echo "$v"
}

# ================================================================ 1. packages
log "step 1/5: packages"
want=(ca-certificates debootstrap debian-archive-keyring xz-utils pigz)
if engine_answers; then
    log "a Docker engine already answers; not installing docker.io"
elif command -v dockerd >/dev/null 2>&1; then
    log "dockerd already installed at $(command -v dockerd); not installing docker.io"
    want+=(iptables)
else
    want+=(docker.io iptables)
fi
missing=()
for p in "${want[@]}"; do is_installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    apt_update
    log "apt-get install ${missing[*]}"
    # docker.io's postinst cannot start the service without an init system; that is expected.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed"
else
    log "all present: ${want[*]}"
fi
[ -n "$DOCKER" ] || DOCKER=$(command -v docker || true)
[ -n "$DOCKER" ] || die "no docker CLI found after installing packages"
log "docker client: $DOCKER ($("$DOCKER" --version 2>/dev/null || echo 'version unknown'))"

# ================================================================ 2. Compose v2
log "step 2/5: Compose v2"
if v=$(compose_version); then
    log "docker compose $v already works"
else
    apt_update
    cand=$(apt-cache policy docker-compose 2>/dev/null | awk '/Candidate:/ { print $2 }')
    if [ -n "$cand" ] && [ "$cand" != "(none)" ] && [ "${cand%%.*}" -ge 2 ] 2>/dev/null; then
        pkgspec=docker-compose # the host's own suites already ship v2
    else
        mirror=$(debian_mirror)
        log "adding $BASE_SUITE apt source ($mirror) pinned at priority 100"
        changed=0
        write_if_changed "$TRIXIE_SOURCES" "# Added by .ci/install-docker.sh for docker-compose v2 only; pinned low in $TRIXIE_PIN
Types: deb
URIs: $mirror
Suites: $BASE_SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" && changed=1
        write_if_changed "$TRIXIE_PIN" "# Added by .ci/install-docker.sh: never prefer $BASE_SUITE packages unless asked for explicitly
Package: *
Pin: release n=$BASE_SUITE
Pin-Priority: 100" && changed=1
        if [ "$changed" -eq 1 ]; then apt_update force; fi
        pkgspec=docker-compose/$BASE_SUITE
    fi
    # NOT `apt-get install -t trixie docker-compose`: that also upgrades docker.io to trixie's 26.x,
    # and the Recommends (docker-cli 26, which Breaks docker.io 20.10) would remove docker.io.
    # Compose is a static Go binary; only itself is needed.
    sim=$(apt-get -s install --no-install-recommends "$pkgspec" 2>&1) || die "cannot install $pkgspec: $sim"
    if printf '%s\n' "$sim" | grep -q '^Remv '; then
        die "installing $pkgspec would remove packages:
$(printf '%s\n' "$sim" | grep '^Remv ')"
    fi
    log "apt-get install --no-install-recommends $pkgspec"
    apt-get install -y -qq --no-install-recommends "$pkgspec" >/dev/null || die "apt-get install $pkgspec failed"
    if ! compose_version >/dev/null; then
        # The CLI searches /usr/local/lib/docker/cli-plugins, /usr/local/libexec/docker/cli-plugins,
        # /usr/lib/docker/cli-plugins and /usr/libexec/docker/cli-plugins; link into one it knows.
        plugin=$(dpkg -L docker-compose | grep -E '/cli-plugins/docker-compose$' | head -n1 || true)
        [ -n "$plugin" ] || plugin=$(command -v docker-compose || true)
        [ -n "$plugin" ] || die "docker-compose installed but no plugin binary found"
        for d in /usr/local/lib/docker/cli-plugins /usr/lib/docker/cli-plugins; do
            mkdir -p "$d" && ln -sf "$plugin" "$d/docker-compose"
        done
        log "linked $plugin into the docker CLI plugin directories"
    fi
    v=$(compose_version) || die "\`docker compose version\` does not report v2 after installing $pkgspec"
    log "docker compose $v ready"
fi

# ================================================================ 3. engine
log "step 3/5: engine"
STARTED_PID=""

is_live_dockerd() { # a running (not zombie) dockerd process with this pid
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    case $stat in *"(dockerd)"" "[RSD]*) return 0 ;; *) return 1 ;; esac
}
LOG_OFFSET=0
this_run_log() { tail -c +"$((LOG_OFFSET + 1))" "$DOCKERD_LOG" 2>/dev/null; }
# Errors meaning "this storage driver cannot work here" (overlay2 on overlayfs/unsupported fs, ...).
STORAGE_ERRORS='error initializing graphdriver|driver not supported|overlay.*(not supported|failed|invalid argument)|failed to mount overlay|operation not permitted.*overlay'

cgroups_ok() { [ -n "$(ls -A /sys/fs/cgroup 2>/dev/null)" ]; }

start_dockerd() { # start_dockerd [storage-driver]
    local driver=${1:-} args=() dev mtu pid ns i
    local conf=/etc/docker/daemon.json
    conf_has() { [ -f "$conf" ] && grep -q "\"$1\"" "$conf"; }

    if ! cgroups_ok; then
        log "mounting cgroup2 on /sys/fs/cgroup (it was empty)"
        mount -t cgroup2 none /sys/fs/cgroup || warn "could not mount cgroups; dockerd may fail"
    fi

    # iptables: Debian defaults to the nft backend; fall back to legacy if nft cannot work here,
    # and run without iptables (no NAT for containers!) only as a last resort.
    if ! conf_has iptables; then
        if iptables -t nat -S >/dev/null 2>&1; then
            :
        elif command -v iptables-legacy >/dev/null && iptables-legacy -t nat -S >/dev/null 2>&1; then
            log "iptables-nft does not work here; switching alternatives to iptables-legacy"
            update-alternatives --set iptables /usr/sbin/iptables-legacy >/dev/null
            update-alternatives --set ip6tables /usr/sbin/ip6tables-legacy >/dev/null 2>&1 || true
        else
            warn "no working iptables: starting dockerd with --iptables=false (containers get no outbound NAT)"
            args+=(--iptables=false)
        fi
    fi

    if [ -n "$driver" ] && ! conf_has storage-driver; then args+=(--storage-driver="$driver"); fi

    # Match the uplink MTU on the default bridge (used by `docker build`) to avoid PMTU black holes.
    dev=$(ip route show default 2>/dev/null | awk '{ for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit } }')
    if [ -n "$dev" ] && ! conf_has mtu; then
        mtu=$(cat "/sys/class/net/$dev/mtu" 2>/dev/null || echo 1500)
        if [ "$mtu" -lt 1500 ]; then args+=(--mtu="$mtu"); fi
    fi

    # DNS: dockerd copies /etc/resolv.conf into containers (and the embedded DNS of user-defined
    # networks forwards to it), dropping loopback servers and falling back to 8.8.8.8/8.8.4.4.
    # So a host with only a loopback resolver needs an explicit reachable --dns.
    if [ -n "${POOL_CI_DOCKER_DNS:-}" ]; then
        for ns in $POOL_CI_DOCKER_DNS; do args+=(--dns="$ns"); done
    elif ! awk '$1 == "nameserver" && $2 !~ /^(127\.|::1$)/ { ok = 1 } END { exit !ok }' /etc/resolv.conf 2>/dev/null &&
        [ ! -f /run/systemd/resolve/resolv.conf ]; then
        warn "/etc/resolv.conf has only loopback nameservers: containers will fall back to 8.8.8.8; set POOL_CI_DOCKER_DNS if that is unreachable"
    fi

    # A stale pid file (dockerd killed uncleanly) makes dockerd refuse to start.
    if [ -f /var/run/docker.pid ]; then
        pid=$(cat /var/run/docker.pid 2>/dev/null || true)
        if [ -n "$pid" ] && is_live_dockerd "$pid"; then
            log "dockerd (pid $pid) is already running but not answering yet; waiting for it"
            STARTED_PID=$pid
            return 0
        fi
        rm -f /var/run/docker.pid
    fi

    # After dockerd is SIGKILLed its containerd child dies too, but stays a zombie until init reaps
    # it (seconds here); a new dockerd takes the zombie for a live containerd and times out after
    # 15s. Wait for the zombie to be reaped first.
    pid=$(cat /var/run/docker/containerd/containerd.pid 2>/dev/null || true)
    if [ -n "$pid" ] && grep -qs '(containerd) Z' "/proc/$pid/stat"; then
        log "waiting for the zombie containerd (pid $pid) of a killed dockerd to be reaped"
        for ((i = 0; i < 30; i++)); do grep -qs '(containerd) Z' "/proc/$pid/stat" || break; sleep 0.5; done
    fi

    touch "$DOCKERD_LOG"
    LOG_OFFSET=$(stat -c %s "$DOCKERD_LOG")
    log "starting: dockerd ${args[*]} (log: $DOCKERD_LOG)"
    printf '\n==== %s install-docker.sh: dockerd %s\n' "$(date -Is)" "${args[*]}" >>"$DOCKERD_LOG"
    setsid nohup dockerd "${args[@]}" >>"$DOCKERD_LOG" 2>&1 </dev/null &
    STARTED_PID=$!
}

wait_for_engine() { # returns 1 if dockerd died, dies on timeout
    local i
    for ((i = 0; i < DOCKERD_TIMEOUT * 2; i++)); do
        if "$DOCKER" info >/dev/null 2>&1; then
            log "engine answers (after ${SECONDS}s total)"
            return 0
        fi
        if [ -n "$STARTED_PID" ] && ! is_live_dockerd "$STARTED_PID"; then
            log "dockerd exited; its last log lines:"
            this_run_log | tail -n 15 >&2
            return 1
        fi
        sleep 0.5
    done
    this_run_log | tail -n 20 >&2
    die "dockerd did not answer within ${DOCKERD_TIMEOUT}s (see $DOCKERD_LOG)"
}

stop_our_dockerd() { # only ever the dockerd this script started
    local i
    [ -n "$STARTED_PID" ] || return 0
    log "stopping dockerd pid $STARTED_PID"
    kill "$STARTED_PID" 2>/dev/null || true
    for ((i = 0; i < 60; i++)); do is_live_dockerd "$STARTED_PID" || break; sleep 0.5; done
    STARTED_PID=""
}

if engine_answers; then
    log "engine already answers; not starting dockerd"
else
    command -v dockerd >/dev/null 2>&1 || die "no engine answers and dockerd is not installed"
    driver=${POOL_CI_STORAGE_DRIVER:-$(cat "$DRIVER_STATE" 2>/dev/null || true)}
    start_dockerd "$driver"
    if ! wait_for_engine; then
        if [ "$driver" != vfs ] && [ -z "${POOL_CI_STORAGE_DRIVER:-}" ] && this_run_log | grep -qiE "$STORAGE_ERRORS"; then
            warn "storage driver problem; retrying with --storage-driver=vfs (slower, uses more disk)"
            start_dockerd vfs
            wait_for_engine || die "dockerd failed to start with vfs too (see $DOCKERD_LOG)"
            echo vfs >"$DRIVER_STATE"
            log "remembered vfs in $DRIVER_STATE (delete it or set POOL_CI_STORAGE_DRIVER to change)"
        else
            # e.g. "timeout waiting for containerd": after dockerd was SIGKILLed its containerd
            # child is still dying when the new dockerd tries to reuse it. A retry fixes that.
            log "retrying dockerd once in 3s"
            sleep 3
            start_dockerd "$driver"
            wait_for_engine || die "dockerd failed to start twice (see $DOCKERD_LOG)"
        fi
    fi
fi
pick_docker_client

# ================================================================ 4. base image
log "step 4/5: base image $BASE_IMAGE"

# debootstrap --variant=minbase trixie, slimmed like the official image, docker import (the
# rootfs tarball is cached, so a re-import takes seconds).
import_base_image() {
    local refresh=()
    if [ "${POOL_CI_REFRESH_BASE:-0}" = 1 ] && [ -z "${REFRESHED:-}" ]; then refresh=(--refresh); fi
    REFRESHED=1
    DOCKER=$DOCKER bash "$BASE_IMAGE_SH" --tag "$BASE_IMAGE" "${refresh[@]}" || die "building $BASE_IMAGE failed"
}

if [ "${POOL_CI_REFRESH_BASE:-0}" != 1 ] && "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "$BASE_IMAGE already present"
else
    import_base_image
fi

# Smoke test: can the engine actually run a container (storage driver, cgroups, runtime)?
if ! out=$("$DOCKER" run --rm --network none "$BASE_IMAGE" true 2>&1); then
    driver_now=$("$DOCKER" info --format '{{.Driver}}' 2>/dev/null || true)
    if [ -n "$STARTED_PID" ] && [ "$driver_now" != vfs ] && [ -z "${POOL_CI_STORAGE_DRIVER:-}" ] &&
        printf '%s' "$out" | grep -qiE "$STORAGE_ERRORS"; then
        warn "cannot run a container with storage driver $driver_now ($out); restarting dockerd with vfs"
        stop_our_dockerd
        start_dockerd vfs
        wait_for_engine || die "dockerd failed to start with vfs (see $DOCKERD_LOG)"
        import_base_image # images are per storage driver
        out=$("$DOCKER" run --rm --network none "$BASE_IMAGE" true 2>&1) ||
            die "still cannot run a container with vfs: $out"
        echo vfs >"$DRIVER_STATE"
        log "remembered vfs in $DRIVER_STATE (delete it or set POOL_CI_STORAGE_DRIVER to change)"
    else
        die "cannot run a container from $BASE_IMAGE: $out"
    fi
fi

# ================================================================ 5. summary
log "step 5/5: summary"
engine=$("$DOCKER" version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')
driver=$("$DOCKER" info --format '{{.Driver}}')
compose=$(compose_version) || die "docker compose v2 not available"
image_id=$("$DOCKER" image inspect --format '{{.Id}}' "$BASE_IMAGE")
image_id=${image_id#sha256:}
echo "docker ready: engine $engine, storage $driver, client $DOCKER, compose $compose, $BASE_IMAGE ${image_id:0:12}"
log "done in ${SECONDS}s"
