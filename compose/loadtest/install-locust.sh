#!/bin/sh
# Install Locust in the load-test image (run by compose/loadtest/Dockerfile at build time):
# the pinned wheels from /tmp/build (./wheelhouse) into /opt/venv if they are there, else
# Debian's python3-locust. Either way `locust` ends up on PATH and its version is printed.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if ls /tmp/build/locust-*.whl >/dev/null 2>&1; then
    apt-get install -y -qq --no-install-recommends python3 >/dev/null
    set -- /tmp/build/pip-*.whl
    [ -f "$1" ] || { echo "wheelhouse has locust but no pip wheel: rerun make loadtest-image" >&2; exit 1; }
    python3 -m venv --without-pip /opt/venv
    # pip runs straight from its wheel; --no-index: nothing is fetched from the network.
    /opt/venv/bin/python3 "$1/pip" install --quiet --no-index --no-cache-dir \
        --find-links /tmp/build locust
else
    echo "no wheelhouse: installing Debian's python3-locust" >&2
    apt-get install -y -qq --no-install-recommends python3-locust >/dev/null
fi
rm -rf /var/lib/apt/lists/* /var/cache/apt/*
PATH=/opt/venv/bin:$PATH locust --version
