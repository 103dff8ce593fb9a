"""A tiny router: path templates with ``{name}`` segments, one handler per method.

Matching is exact (no trailing-slash guessing): an unknown path is a 404, a known path with an
unserved method a 405 listing the methods that are served. HEAD is served wherever GET is (the
application drops the body).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from .errors import method_not_allowed, not_found

Handler = Callable[..., Any]


class Router:
    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = []

    def add(self, template: str, method: str, handler: Handler) -> None:
        """Serve ``method`` on ``template``, e.g. ``add("/items/{item_id}", "GET", get_item)``."""
        pattern = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template) + "$")
        for existing, methods in self._routes:
            if existing.pattern == pattern.pattern:
                methods[method] = handler
                return
        self._routes.append((pattern, {method: handler}))

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and the path's ``{name}`` values; HTTPError 404 or 405 otherwise."""
        for pattern, methods in self._routes:
            found = pattern.match(path)
            if found is None:
                continue
            handler = methods.get("GET" if method == "HEAD" else method)
            if handler is None:
                raise method_not_allowed(self._allowed(methods))
            return handler, found.groupdict()
        raise not_found("no such resource")

    @staticmethod
    def _allowed(methods: dict[str, Handler]) -> list[str]:
        allowed = sorted(methods)
        return allowed + ["HEAD"] if "GET" in methods else allowed

