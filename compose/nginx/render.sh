#!/bin/sh
# Render nginx.conf.template into a config file: every @NGINX_NAME@ becomes $NGINX_NAME.
# One renderer for both stacks: the nginx container's entrypoint runs it at start, the native
# stack (native/services.py) runs it on the host.
#
#   NGINX_LISTEN_THREADED=127.0.0.1:8001 ... sh render.sh nginx.conf.template out/nginx.conf
#
# Required (no default, they differ per stack):
#   NGINX_LISTEN_THREADED  NGINX_LISTEN_PROCESS  NGINX_LISTEN_NOPOOL     address:port to listen on
#   NGINX_UPSTREAM_THREADED NGINX_UPSTREAM_PROCESS NGINX_UPSTREAM_NOPOOL  address:port (or unix:path)
#                                                                         of each gunicorn
#   NGINX_RUN_DIR          pid file and temp directories (writable by nginx's user)
#   NGINX_ERROR_LOG  NGINX_ACCESS_LOG   log files (or /dev/stderr, /dev/stdout)
# Knobs (defaults below):
#   NGINX_WORKER_PROCESSES       auto (one per core)
#   NGINX_MAX_CONN_PER_CLIENT    128 requests in progress per client address at once
#   NGINX_CLIENT_HEADER_TIMEOUT  5s to send the whole request header
#   NGINX_CLIENT_BODY_TIMEOUT    10s between two reads of the body
#   NGINX_MAX_BODY               16k largest body nginx accepts (the app's own limit is 4 KiB)
set -eu
[ $# -eq 2 ] || { echo "usage: render.sh TEMPLATE OUTPUT" >&2; exit 2; }
template=$1
out=$2
: "${NGINX_WORKER_PROCESSES:=auto}" "${NGINX_MAX_CONN_PER_CLIENT:=128}"
: "${NGINX_CLIENT_HEADER_TIMEOUT:=5s}" "${NGINX_CLIENT_BODY_TIMEOUT:=10s}" "${NGINX_MAX_BODY:=16k}"

script=
for name in $(grep -o '@NGINX_[A-Z_]*@' "$template" | tr -d @ | sort -u); do
    eval "value=\${$name-}" # $name is [A-Z_] only (the grep above), so this eval is safe
    if [ -z "$value" ]; then
        echo "render.sh: $name is not set (needed by $template)" >&2
        exit 2
    fi
    # Values go into the config unquoted: allow only what addresses, sizes and paths need.
    case $value in *[!A-Za-z0-9_./:-]*)
        echo "render.sh: $name='$value' may only contain letters, digits and _ . / : -" >&2
        exit 2
        ;;
    esac
    script="${script}s|@$name@|$value|g;"
done
sed -e "$script" "$template" >"$out.tmp"
mv "$out.tmp" "$out"
