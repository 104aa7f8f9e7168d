"""Answering a corporate proxy's 407: Basic, NTLM and Negotiate (Kerberos/SPNEGO), without I/O.

:func:`parse_challenges` reads ``Proxy-Authenticate`` fields; :func:`choose_scheme` picks the best
scheme this side can answer; a :class:`SchemeAuth` turns each challenge into the next
``Proxy-Authorization`` value. NTLM and Negotiate tokens come from ``pyspnego`` (pure Python NTLM;
Kerberos through GSSAPI where the ``gssapi`` package and a ticket are present; SSPI on Windows).

Credentials: explicit ones (user name as ``DOMAIN\\user`` or ``user@REALM``, and password), or,
when none are configured, the logged-in user's where the platform provides them: the Kerberos
ticket cache, Windows' SSPI, or pyspnego's ``NTLM_USER_FILE``. Basic always needs explicit ones.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

# Preference when a proxy offers several: the strongest first.
SUPPORTED_SCHEMES = ("negotiate", "ntlm", "basic")
_DISPLAY = {"negotiate": "Negotiate", "ntlm": "NTLM", "basic": "Basic"}
_CHALLENGE = re.compile(r"^\s*([A-Za-z0-9!#$%&'*+.^_`|~-]+)(?:\s+(.*))?$")


class AuthUnavailableError(Exception):
    """This side cannot answer the scheme (no credentials, or the platform has none)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """Explicit proxy credentials; ``username=None`` means "the logged-in user's, if any"."""

    username: str | None = None
    password: str | None = None

    @property
    def explicit(self) -> bool:
        return self.username is not None and self.password is not None


def display_scheme(scheme: str) -> str:
    """``NTLM``, ``Negotiate``, ``Basic``; other schemes capitalised (``Digest``)."""
    return _DISPLAY.get(scheme.lower(), scheme[:1].upper() + scheme[1:].lower())


def parse_challenges(values: list[bytes]) -> dict[str, str]:
    """Map each scheme (lowercase) in ``Proxy-Authenticate`` values to its parameter text.

    Handles one challenge per field (what proxies send for NTLM and Negotiate) and the
    comma-joined form for schemes without a token (``NTLM, Basic realm="x"``).
    """
    found: dict[str, str] = {}
    for raw in values:
        text = raw.decode("latin-1")
        for part in _split_challenges(text):
            match = _CHALLENGE.match(part)
            if match:
                found.setdefault(match.group(1).lower(), (match.group(2) or "").strip())
    return found


def _split_challenges(text: str) -> list[str]:
    # Commas outside quotes separate items; an item that is an auth-param ("name=value")
    # continues the previous challenge, anything else starts a new one.
    items, current, quoted, escaped = [], "", False, False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append(current)
            current = ""
            continue
        current += char
    items.append(current)
    parts: list[str] = []
    for item in items:
        head = item.strip().split(" ", 1)[0]
        if parts and ("=" in head.rstrip("=") or not head):
            parts[-1] += "," + item
        else:
            parts.append(item.strip())
    return parts


def choose_scheme(offered: dict[str, str], tried: set[str]) -> str | None:
    """The best scheme in ``offered`` that was not tried yet, or ``None``."""
    for scheme in SUPPORTED_SCHEMES:
        if scheme in offered and scheme not in tried:
            return scheme
    return None


class SchemeAuth:
    """One scheme's side of the exchange for one proxy connection.

    ``first()`` gives the header value for the first authenticated request; ``respond(params)``
    the next one from the proxy's challenge parameters (an NTLM/Negotiate token), or ``None``
    when there is nothing left to send, i.e. the proxy refused the credentials.
    Raises :class:`AuthUnavailableError` when this side has nothing to answer with.
    """

    def __init__(self, scheme: str, credentials: Credentials, proxy_host: str) -> None:
        self.scheme = scheme
        self._credentials = credentials
        self._proxy_host = proxy_host
        self._sent_final = False
        self._context: object | None = None

    def first(self) -> str:
        if self.scheme == "basic":
            creds = self._credentials
            if not creds.explicit:
                raise AuthUnavailableError("Basic needs a user name and password")
            assert creds.username is not None and creds.password is not None
            token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            self._sent_final = True
            return f"Basic {token}"
        value = self._spnego_step(None)
        if value is None:
            raise AuthUnavailableError(f"{display_scheme(self.scheme)} produced no token")
        return value

    def respond(self, params: str) -> str | None:
        if self._sent_final or self.scheme == "basic":
            return None
        token = params.split(",", 1)[0].strip()
        if not token:
            return None  # the proxy restarted the exchange: our last message was refused
        try:
            incoming = base64.b64decode(token, validate=True)
        except ValueError:
            return None
        return self._spnego_step(incoming)

    def _spnego_step(self, incoming: bytes | None) -> str | None:
        """The next NTLM/Negotiate header value; ``None`` if the proxy's token ends the exchange
        (a refusal). Failing to start (no credentials) raises :class:`AuthUnavailableError`."""
        import spnego
        import spnego.exceptions

        try:
            if self._context is None:
                creds = self._credentials
                self._context = spnego.client(
                    creds.username,
                    creds.password,
                    hostname=self._proxy_host,
                    service="HTTP",
                    protocol=self.scheme,
                )
            context = self._context
            assert isinstance(context, spnego.ContextProxy)
            out = context.step(incoming)
        except (spnego.exceptions.SpnegoError, ValueError) as exc:
            if incoming is not None:
                return None  # the proxy's token was a rejection or garbage
            who = "the configured user" if self._credentials.username else "this login session"
            raise AuthUnavailableError(
                f"no {display_scheme(self.scheme)} credentials for {who}: {_first_line(str(exc))}"
            ) from None
        if out is None:
            return None
        if context.complete or (incoming is not None and self.scheme == "ntlm"):
            # NTLM is negotiate, challenge, authenticate: that was the last message.
            self._sent_final = True
        return f"{display_scheme(self.scheme)} {base64.b64encode(out).decode()}"


def _first_line(text: str) -> str:
    return " ".join(text.split())[:160]
