#!/bin/sh
# Install the app image's Python runtime (run by compose/app/Dockerfile at build time).
#   debian     python3, python3-psycopg2 and gunicorn from the Debian archive
#   wheelhouse python3 from Debian; gunicorn and psycopg2-binary (libpq bundled) from the wheels in /tmp/build
#              (made by `make wheelhouse`) installed offline into /opt/venv
set -eu
mode=${1:-debian}
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
case $mode in
debian)
    apt-get install -y -qq --no-install-recommends python3 python3-psycopg2 gunicorn >/dev/null
    ;;
wheelhouse)
    apt-get install -y -qq --no-install-recommends python3 >/dev/null
    set -- /tmp/build/pip-*.whl
    if [ ! -f "$1" ] || ! ls /tmp/build/gunicorn-*.whl >/dev/null 2>&1; then
        echo "PY_DEPS=wheelhouse but ./wheelhouse has no pip/gunicorn wheels: run 'make wheelhouse'" >&2
        exit 1
    fi
    python3 -m venv --without-pip /opt/venv
    # pip runs straight from its wheel; nothing is fetched from the network.
    /opt/venv/bin/python3 "$1/pip" install --quiet --no-index --no-cache-dir \
        --find-links /tmp/build gunicorn psycopg2-binary
    ;;
*)
    echo "unknown PY_DEPS '$mode' (debian or wheelhouse)" >&2
    exit 2
    ;;
esac
rm -rf /var/lib/apt/lists/* /var/cache/apt/*
py=python3
if [ -x /opt/venv/bin/python3 ]; then py=/opt/venv/bin/python3; fi
"$py" -c 'import psycopg2, gunicorn; print("python deps:", psycopg2.__version__, "gunicorn", gunicorn.__version__)'
