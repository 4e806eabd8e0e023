"""Secure by default: loopback only, unless a token guards the API (bearer) and the pages (sign-in).

The session cookie holds an HMAC of a fixed message under the token, never the token itself;
ids in URLs are checked against one pattern before anything is looked up.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re

from fastapi import HTTPException, Request

from cxr.core.errors import DataError

TOKEN_ENV = "CXR_APP_TOKEN"
MIN_TOKEN_LENGTH = 16
SESSION_COOKIE = "cxr_session"
# Run ids and study names as the app builds them (output_name's alphabet, plus "~" between a
# store and its dated folder); a leading dot is refused so no id can name "." or "..".
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._~-]{0,199}$")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen on a non-loopback address without a token (and any too-short token)."""
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise DataError(f"{TOKEN_ENV} is shorter than {MIN_TOKEN_LENGTH} characters; use a long random token "
                        "(for example `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    if not is_loopback(host) and not token:
        raise DataError(f"refusing to listen on {host}: the app binds to loopback (127.0.0.1) unless {TOKEN_ENV} is set, "
                        "so that nobody else on the network can upload studies or read results; set the token "
                        "(bearer token for the API, sign-in for the pages) or bind to 127.0.0.1")


def session_value(token: str) -> str:
    return hmac.new(token.encode(), b"cxr-app-session", hashlib.sha256).hexdigest()


def valid_id(value: str, what: str = "id") -> str:
    """`value` when it matches ID_PATTERN, else a 404 (an id that cannot exist)."""
    if not ID_PATTERN.fullmatch(value or ""):
        raise HTTPException(404, f"no such {what}")
    return value


def signed_in(request: Request) -> bool:
    """True when no token is configured, or the request carries the bearer token or the session cookie."""
    token = request.app.state.token
    if not token:
        return True
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
        return True
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return hmac.compare_digest(cookie.encode(), session_value(token).encode())


def require_api_token(request: Request) -> None:
    """API dependency: 401 with a bearer challenge unless signed in."""
    if not signed_in(request):
        raise HTTPException(401, "a bearer token is required (Authorization: Bearer $CXR_APP_TOKEN)",
                            headers={"WWW-Authenticate": "Bearer"})


def safe_next(path: str | None) -> str:
    """A local path to return to after signing in (never another site)."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path
