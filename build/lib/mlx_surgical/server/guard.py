"""The checks every request passes before a route sees it, so that no other web page can drive
the server through the user's browser.

A browser sends a cross-site POST with a `text/plain` or form body without asking first, and
a page whose name was re-pointed at 127.0.0.1 (DNS rebinding) reaches the server with its own
name in `Host`. So: the Host must be one of this server's names, a request from another
origin is refused, bodies must be JSON (which a browser only sends cross-site after a
preflight this server never grants), and with a token every route but the dashboard's static
files and a bare health answer needs `Authorization: Bearer TOKEN`.
"""

import secrets
from typing import Iterable, Optional
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::")  # binding to these means every interface: no one name to check Host against
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def problem(status: int, *problems: str) -> JSONResponse:
    return JSONResponse({"problems": list(problems)}, status_code=status)


def host_name(host: str) -> str:
    """The name in a Host header (or an Origin's netloc), without the port."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_public(path: str) -> bool:
    """The dashboard's own files and the health check answer without a token; they hold no data."""
    return path in ("/", "/api/health") or (path.startswith("/static/") and ".." not in path)


class RequestGuard:
    """ASGI middleware refusing, in order: a foreign Host (403), a foreign Origin or a
    cross-site fetch of the API (403), a missing or wrong token (401), an oversized body (413)
    and a body that is not JSON (415). It tells the routes whether the request carried the
    token in `request.state.authorized`."""

    def __init__(self, app: ASGIApp, token: Optional[str], bound_host: str, allow_hosts: Iterable[str],
                 max_body: int):
        self.app = app
        self.token = token.encode() if token else None
        self.proxy_hosts = {host_name(h) for h in allow_hosts}
        self.hosts = set(LOOPBACK) | self.proxy_hosts | ({host_name(bound_host)} - set(WILDCARD))
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        authorized = self.authorized(headers)
        refusal = self.refusal(scope["method"], scope["path"], headers, authorized)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        scope.setdefault("state", {})["authorized"] = authorized
        await self.app(scope, receive, send)

    def authorized(self, headers: Headers) -> bool:
        if self.token is None:
            return True
        scheme, _, sent = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(sent.strip().encode("latin-1"), self.token)

    def refusal(self, method: str, path: str, headers: Headers, authorized: bool) -> Optional[JSONResponse]:
        host = headers.get("host")
        if host is None or host_name(host) not in self.hosts:
            return problem(403, f"Host '{host}' is not a name of this server; use http://127.0.0.1 or "
                                "start `mlx-surgical serve` with --allow-host NAME for the name clients use")
        origin = headers.get("origin")
        if origin is not None and not self.same_origin(origin, host):
            return problem(403, f"requests from the web page at {origin} are refused: only this server's own "
                                "dashboard may call it from a browser")
        if headers.get("sec-fetch-site") == "cross-site" and path.startswith("/api/"):
            return problem(403, "cross-site requests to the API are refused")
        if not authorized and not is_public(path):
            return problem(401, "missing or wrong token: send 'Authorization: Bearer <token>' "
                                "(the dashboard asks for it)")
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return problem(400, f"Content-Length '{length}' is not a number")
            if int(length) > self.max_body:
                return problem(413, f"request body is {int(length):,} bytes; the limit is {self.max_body:,}")
        has_body = (length is not None and int(length) > 0) or "transfer-encoding" in headers
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if method in BODY_METHODS and has_body and media_type != "application/json":
            return problem(415, f"request body is '{media_type or 'without a Content-Type'}': send JSON with "
                                "'Content-Type: application/json'")
        return None

    def same_origin(self, origin: str, host: str) -> bool:
        """The page calling is served by this server (same name and port as the request's Host),
        or sits on a name given with --allow-host (a reverse proxy in front, on any port)."""
        netloc = urlsplit(origin).netloc.lower()
        return bool(netloc) and (netloc == host.strip().lower() or host_name(netloc) in self.proxy_hosts)
