"""The read-your-writes users of the lag scenario (``locust -f loadtest/readback.py``).

Each user writes an item and reads it back at once, the flow that breaks when a replica lags:
POST /items, then GET /items/<the new id>. Half of the users (``TokenReadBackUser``) send the
201's read-your-writes token back in ``X-Read-After`` (protections on), the other half
(``PlainReadBackUser``) do not (protections off). A read-back that answers 404, or another name
than the one written, is a *stale read*: a failed request whose error starts with "stale:".

Requests go to the per-request log of ``locustfile.py`` (imported as a module, so that its
``ItemsUser`` does not join this run: Locust runs every User class a locustfile defines or
imports by name). The ``read_after`` column tells the two halves apart. Settings as in
locustfile.py; LOADTEST_USER_RPS counts requests, and one iteration makes two.
"""

from __future__ import annotations

import uuid

from locust import FastHttpUser, constant, constant_throughput, task

import locustfile as common


class ReadBackUser(FastHttpUser):
    abstract = True
    send_token = False
    network_timeout = common.ItemsUser.network_timeout
    connection_timeout = common.ItemsUser.connection_timeout
    default_headers = common.ItemsUser.default_headers
    max_retries = 0
    wait_time = constant_throughput(common.USER_RPS / 2) if common.USER_RPS > 0 else constant(0)

    @task
    def write_then_read(self) -> None:
        name = f"rb-{uuid.uuid4().hex[:16]}"
        with self.client.post("/items", json={"name": name}, name="POST /items", catch_response=True,
                              context={"kind": "write"}) as resp:
            if resp.status_code != 201:
                return  # Locust fails it as a non-2xx
            try:
                body = resp.json()
                item_id = body["id"]
            except (ValueError, KeyError, TypeError):
                resp.failure("201 without an id")
                return
            token = resp.headers.get(common.READ_AFTER) or body.get("read_after")
        headers, tag = {}, "omitted"
        if self.send_token:
            headers, tag = ({common.READ_AFTER: token}, "sent") if token else ({}, "none-issued")
        with self.client.get(f"/items/{item_id}", name="GET /items/<id> (read back)", headers=headers,
                             catch_response=True, context={"kind": "read", "read_after": tag}) as got:
            if got.status_code == 404:
                got.failure("stale: 404 for an id the app acknowledged just before")
            elif got.status_code == 200:
                try:
                    seen = got.json().get("name")
                except ValueError:
                    seen = None
                if seen != name:
                    got.failure(f"stale: read back {seen!r}, wrote {name!r}")


class TokenReadBackUser(ReadBackUser):
    """Sends the 201's X-Read-After token with the read-back: protections on."""

    send_token = True


class PlainReadBackUser(ReadBackUser):
    """Reads back without the token: protections off."""
