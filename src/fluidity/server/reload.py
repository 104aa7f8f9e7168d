"""Reload the server's TLS material and CRL without a restart: on change (mtime poll) or SIGHUP.

What is reloaded: the SSL context (certificate, key and CA, from whatever ``cert_source`` says)
and the revocation list (``crl_file``). New connections use the new material at once; links
already open keep their TLS session and continue, except links of agents whose certificate the
new CRL revokes, which are closed with a ``link.revoked`` log line (a revoked laptop must not keep
a tunnel it opened before). A reload that fails (a half-written key, a CRL signed by another CA)
is logged with the reason and changes nothing: the server keeps serving with the old material.

Polling compares (mtime, size, inode) of the files every ``tls_reload_interval`` seconds, which
catches editors, ``cp`` and atomic renames alike; SIGHUP reloads unconditionally (the only way to
reload material from ``env`` or Secrets Manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

from fluidity.config import ServerConfig
from fluidity.crl import RevocationList, load_crl, revoked_reason
from fluidity.errors import FluidityError
from fluidity.logs import log
from fluidity.server.listener import Server
from fluidity.tls import peer_identity

logger = logging.getLogger("fluidity.server")

Fingerprint = tuple[tuple[str, int, int, int], ...]


class TlsReloader:
    """Keeps ``server.ssl_context`` and ``server.revocations`` current; see the module docstring.

    ``build_context`` makes a fresh server SSL context from the configuration (it raises a
    :class:`~fluidity.errors.FluidityError` saying what is wrong). Construct it before the server
    listens: a CRL that exists but is invalid stops the start with that error.
    """

    def __init__(
        self, server: Server, config: ServerConfig, build_context: Callable[[], ssl.SSLContext]
    ) -> None:
        self.server = server
        self.config = config
        self.build_context = build_context
        self.reloads = 0
        self._task: asyncio.Task[None] | None = None
        self._fingerprint = self._files_fingerprint()
        server.revocations = self._load_revocations()

    def _watched(self) -> list[Path]:
        config = self.config
        paths = []
        if config.cert_source == "file":
            paths += [config.cert_file, config.key_file, config.ca_cert_file]
        if config.crl_file is not None:
            paths.append(config.crl_file)
        return paths

    def _files_fingerprint(self) -> Fingerprint:
        marks = []
        for path in self._watched():
            try:
                stat = path.stat()
            except OSError:
                marks.append((str(path), -1, -1, -1))
            else:
                marks.append((str(path), stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(marks)

    def _load_revocations(self) -> RevocationList | None:
        path = self.config.crl_file
        if path is None:
            return None
        if not path.exists():
            log(logger, logging.WARNING, "tls.crl_missing", crl_file=path,
                hint="nothing is revoked until it exists; loaded when it appears")  # fmt: skip
            return None
        from fluidity import certs

        revocations = load_crl(path, certs.load_certificate(self.config.ca_cert_file))
        if revocations.stale:
            log(logger, logging.WARNING, "tls.crl_stale", crl_file=path,
                next_update=revocations.next_update,
                hint="run `fluidity certs revoke` again to re-sign it")  # fmt: skip
        return revocations

    def start(self) -> None:
        """Poll for changes every ``tls_reload_interval`` (if positive) and reload on SIGHUP."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, self.reload, "sighup")
        if self.config.tls_reload_interval > 0:
            self._task = loop.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.tls_reload_interval)
            fingerprint = self._files_fingerprint()
            if fingerprint != self._fingerprint:
                self.reload("changed")

    def reload(self, trigger: str) -> bool:
        """Load everything afresh; swap it in if all of it is valid. Returns whether it was."""
        self._fingerprint = self._files_fingerprint()
        try:
            context = self.build_context()
            revocations = self._load_revocations()
        except (FluidityError, OSError, ValueError) as exc:
            log(logger, logging.ERROR, "tls.reload_failed", trigger=trigger, reason=str(exc),
                hint="the server keeps the certificates and CRL it had")  # fmt: skip
            return False
        server = self.server
        server.ssl_context = context
        server.revocations = revocations
        self.reloads += 1
        log(logger, logging.INFO, "tls.reloaded", trigger=trigger,
            revoked=len(revocations.serials) if revocations else 0,
            crl_number=revocations.number if revocations else "-")  # fmt: skip
        for link in list(server.links):
            transport = link.transport
            ssl_object = transport.get_extra_info("ssl_object") if transport else None
            if reason := revoked_reason(revocations, ssl_object):
                log(logger, logging.WARNING, "link.revoked", peer=link.peer,
                    agent=peer_identity(ssl_object), reason=reason)  # fmt: skip
                link.close()
        return True

    async def stop(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
