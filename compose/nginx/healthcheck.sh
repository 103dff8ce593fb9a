#!/bin/bash
# Container healthcheck: GET /healthz through each of the three servers answers 200 (bash's
# /dev/tcp: the image has no HTTP client, and needs none).
set -u
for port in 8001 8002 8003; do
    if ! exec 3<>"/dev/tcp/127.0.0.1/$port"; then
        echo "port $port: no answer"
        exit 1
    fi
    printf 'GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
    read -r -t 4 status <&3 || status="(no status line)"
    exec 3<&-
    case $status in
    "HTTP/1."?" 200 "*) ;;
    *)
        echo "port $port: $status"
        exit 1
        ;;
    esac
done
echo ok
