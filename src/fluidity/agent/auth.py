"""Proxy authentication for an agent shared on a LAN: HTTP Basic and SOCKS5 username/password.

One list of users (``proxy_auth.users``) serves both front ends: HTTP clients send
``Proxy-Authorization: Basic`` (RFC 7617 over RFC 9110 §11.7.1), SOCKS5 clients log in with
RFC 1929. Checks take the same time whatever is wrong: the user name and password are hashed
(SHA-256, so lengths do not show) and compared with :func:`hmac.compare_digest` against every
configured user, without stopping at the first match. Basic sends the password in clear: on a LAN
that is visible to anyone on the path, so use it on networks you trust.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import logging
from collections.abc import Iterable, Sequence

from fluidity.agent.first_read import current_client
from fluidity.agent.http_messages import LocalResponse
from fluidity.logs import log

logger = logging.getLogger("fluidity.agent.auth")

Header = tuple[bytes, bytes]


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def parse_basic(value: bytes) -> tuple[bytes, bytes] | None:
    """``(username, password)`` from a ``Basic <base64>`` credential, or ``None`` if malformed."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = binascii.a2b_base64(token.strip(), strict_mode=True)
    except binascii.Error:
        return None
    username, colon, password = decoded.partition(b":")
    return (username, password) if colon else None


class ProxyAuthenticator:
    """Checks proxy credentials against the configured users (none configured: everyone passes)."""

    def __init__(self, users: Iterable[tuple[str, str]], realm: str = "fluidity") -> None:
        self._users = [(_digest(u.encode()), _digest(p.encode())) for u, p in users]
        self.realm = realm
        self.failures = 0  # refused attempts, for the status page

    @property
    def enabled(self) -> bool:
        return bool(self._users)

    def check(self, username: bytes, password: bytes) -> bool:
        """True if ``username``/``password`` belong to a configured user (constant time)."""
        given_user, given_password = _digest(username), _digest(password)
        found = False
        for user, password_digest in self._users:
            same_user = hmac.compare_digest(given_user, user)
            same_password = hmac.compare_digest(given_password, password_digest)
            found |= same_user & same_password
        return found

    def check_socks(self, username: bytes, password: bytes) -> bool:
        """:meth:`check` for SOCKS5 logins, counting failures."""
        ok = self.check(username, password)
        if not ok:
            self.failures += 1
        return ok

    def check_header(self, headers: Sequence[Header], name: bytes) -> bool | None:
        """Check the Basic credentials in header ``name`` (lowercase): ``None`` if absent."""
        values = [value for key, value in headers if key.lower() == name]
        if not values:
            return None
        credentials = parse_basic(values[0]) if len(values) == 1 else None
        ok = credentials is not None and self.check(*credentials)
        if not ok:
            self.failures += 1
            log(logger, logging.INFO, "proxy.auth_failed", client=current_client(),
                header=name.decode())  # fmt: skip
        return ok

    def authorize_proxy_request(self, headers: Sequence[Header]) -> LocalResponse | None:
        """``None`` if the request may be proxied, else the 407 to answer (HTTP front end)."""
        if not self._users or self.check_header(headers, b"proxy-authorization"):
            return None
        return LocalResponse(
            status=407,
            body=b"fluidity: proxy authentication required: send Proxy-Authorization: Basic "
            b"(curl --proxy-user USER:PASSWORD)\n",
            headers=(("Proxy-Authenticate", self._challenge()),),
        )

    def authorize_page(self, headers: Sequence[Header]) -> LocalResponse | None:
        """``None`` if a page of the agent may be shown to a remote client, else the 401."""
        if not self._users or self.check_header(headers, b"authorization"):
            return None
        return LocalResponse(
            status=401,
            body=b"fluidity: log in with a proxy user to see this page\n",
            headers=(("WWW-Authenticate", self._challenge()),),
        )

    def _challenge(self) -> str:
        realm = self.realm.replace("\\", "\\\\").replace('"', '\\"')
        return f'Basic realm="{realm}", charset="UTF-8"'
