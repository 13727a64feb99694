"""Who may open the review page, and where the secrets live.

Two secrets, never mixed: the backend's API token stays in the web server's process (read from a file, used only
by `SSLSegmentLib.review.client`), and the page's own access token guards the page when it is served beyond this
machine. The page token is written to an owner-only file and only that file's path is printed, as `sslsegment
serve` does with the backend token. A browser shows it once, as `?access=TOKEN`; the server answers with an
HttpOnly cookie and a redirect to the same address without it, so the token leaves the address bar and the
history, and every later request (the page, its scripts, the websocket) carries the cookie instead.

Standard library only, except `page_access_middleware`, which imports aiohttp (what trame serves with).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from pathlib import Path

QUERY_PARAMETER = "access"
COOKIE_NAME = "sslsegment_page"


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, "localhost")."""
    if not isinstance(host, str) or not host:
        raise ValueError(f"host must be a non-empty string, got {host!r}")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that resolves elsewhere, or "0.0.0.0": reachable from other machines


def read_token_file(path: str | os.PathLike) -> str:
    """The secret in `path` (surrounding white space removed); a clear error for a missing or empty file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such token file")
    token = path.read_text().strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"{path}: the token file must hold one token on one line")
    return token


def create_page_token(path: str | os.PathLike) -> str:
    """A new random page token written to `path` readable by its owner only (0600), replacing an older one so a
    restarted server never accepts a link handed out before."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return token


class PageAccess:
    """The page's access rule. token None: no check (loopback, where only this machine's users reach the page)."""

    def __init__(self, token: str | None):
        if token is not None and (not isinstance(token, str) or len(token) < 16):
            raise ValueError("a page token must be a string of at least 16 characters")
        self.token = token

    @property
    def required(self) -> bool:
        return self.token is not None

    def accepts(self, presented: str | None) -> bool:
        """True when no token is required or `presented` is the token (compared in constant time)."""
        if self.token is None:
            return True
        return isinstance(presented, str) and hmac.compare_digest(presented.encode(), self.token.encode())

    def decide(self, query_token: str | None, cookie_token: str | None) -> str:
        """What to do with a request: "allow", "set-cookie" (a valid token in the address: set the cookie and
        redirect without it) or "deny"."""
        if not self.required:
            return "allow"
        if query_token is not None:
            return "set-cookie" if self.accepts(query_token) else "deny"
        return "allow" if self.accepts(cookie_token) else "deny"


def page_access_middleware(access: PageAccess, secure_cookie: bool = False):
    """An aiohttp middleware that applies `access` to every request the web server answers (page, scripts,
    websocket)."""
    from aiohttp import web

    @web.middleware
    async def check_page_access(request, handler):
        decision = access.decide(request.query.get(QUERY_PARAMETER), request.cookies.get(COOKIE_NAME))
        if decision == "allow":
            return await handler(request)
        if decision == "deny":
            return web.Response(status=403, content_type="text/plain",
                                text="This review page needs its access link (the token in the file the server "
                                     "named when it started).\n")
        query = {k: v for k, v in request.query.items() if k != QUERY_PARAMETER}
        response = web.Response(status=302, headers={"Location": str(request.rel_url.with_query(query))})
        response.set_cookie(COOKIE_NAME, access.token, httponly=True, samesite="Strict", secure=secure_cookie,
                            path="/")
        return response

    return check_page_access


__all__ = ["COOKIE_NAME", "PageAccess", "QUERY_PARAMETER", "create_page_token", "is_loopback",
           "page_access_middleware", "read_token_file"]
