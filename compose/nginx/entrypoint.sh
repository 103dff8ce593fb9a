#!/bin/sh
# Entrypoint of the nginx container: render the shared template, check it, run nginx in the
# foreground. Listens on 8001-8003 (compose publishes them on the host's 127.0.0.1); the
# upstreams come from the environment (docker-compose.yml: the apps' fixed addresses, so nginx
# never resolves a name, and an app container that restarts keeps its address).
#   NGINX_UPSTREAM_THREADED / _PROCESS / _NOPOOL   address:port or unix:path of each gunicorn (required)
#   NGINX_MAX_CONN_PER_CLIENT, NGINX_CLIENT_HEADER_TIMEOUT, ...   see render.sh
set -eu
run=/run/nginx-stack
cp /etc/nginx/stack/json-errors.conf "$run/"
export NGINX_RUN_DIR=$run NGINX_ERROR_LOG=/dev/stderr NGINX_ACCESS_LOG=/dev/stdout \
    NGINX_LISTEN_THREADED=0.0.0.0:8001 NGINX_LISTEN_PROCESS=0.0.0.0:8002 NGINX_LISTEN_NOPOOL=0.0.0.0:8003
sh /etc/nginx/stack/render.sh /etc/nginx/stack/nginx.conf.template "$run/nginx.conf"
set -- nginx -p "$run" -c "$run/nginx.conf" -e /dev/stderr
"$@" -t -q
exec "$@" -g 'daemon off;'
