"""The checks behind ``fluidity doctor``, in the order a link needs them to pass.

1. the config is valid; 2. the certificate files are readable, the key matches, none expired
(a warning under 30 days left); 3. the CA signs them; 4. the server's name resolves and its port
answers over TCP (skipped when the link goes through a proxy); 5. the upstream proxy answers and
which authentication it asks for; 6. the TLS handshake with the server (a certificate our CA did
not sign means something intercepts TLS); 7. a PING over a real link. Each gives a
:class:`Check` (pass, warn, fail or skip) with a hint when it fails.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from fluidity import certs
from fluidity.agent.frontends import check_exposure, upstream_connector
from fluidity.agent.tunnel import Tunnel
from fluidity.agent.upstream import UpstreamError, describe_oserror, open_tcp
from fluidity.agent.upstream_auth import display_scheme, parse_challenges
from fluidity.agent.upstream_routes import ProxyEndpoint
from fluidity.config import AgentConfig, load_config
from fluidity.errors import FluidityError
from fluidity.tls import ALPN_PROTOCOL, client_context, explain_handshake_error

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
_NOT_OUR_CA_CODES = frozenset({2, 7, 18, 19, 20, 21})  # OpenSSL verify codes: unknown issuer


@dataclass
class Check:
    """One line of the report: ``status`` is pass, warn, fail or skip."""

    name: str
    status: str
    detail: str
    hint: str = ""


@dataclass
class Doctor:
    """Runs the checks for one agent configuration; ``timeout`` (seconds) bounds each network
    step."""

    config_path: Path | None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    environ: Mapping[str, str] | None = None
    timeout: float = 10.0
    results: list[Check] = field(default_factory=list)

    def add(self, name: str, status: str, detail: str, hint: str = "") -> Check:
        check = Check(name, status, detail, hint)
        self.results.append(check)
        return check

    async def run(self) -> list[Check]:
        config = self.check_config()
        if config is None:
            for name in ("certificates", "CA", "server address", "upstream proxy", "TLS", "PING"):
                self.add(name, SKIP, "needs a valid configuration")
            return self.results
        certs_ok = self.check_certificates(config)
        self.check_ca(config)
        connector = upstream_connector(config, self.environ)
        await self.check_server_address(config, proxied=connector is not None)
        await self.check_upstream(config, connector)
        if certs_ok:
            tls_ok = await self.check_tls(config, connector)
        else:
            tls_ok = False
            self.add("TLS", SKIP, "needs readable, matching, valid certificates")
        if tls_ok:
            await self.check_ping(config, connector)
        else:
            self.add("PING", SKIP, "needs a TLS handshake that works")
        return self.results

    # --- 1. config -------------------------------------------------------------------------------

    def check_config(self) -> AgentConfig | None:
        where = str(self.config_path) if self.config_path else "built-in defaults"
        try:
            config = load_config(
                AgentConfig, self.config_path, overrides=self.overrides, environ=self.environ
            )
            if not config.server_ip:
                raise FluidityError("no server address: set server_ip or pass --server-ip")
            check_exposure(config)
            upstream_connector(config, self.environ)
        except FluidityError as exc:
            self.add("config", FAIL, f"{where}: {exc}", "fix the key named above")
            return None
        self.add(
            "config",
            PASS,
            f"{where} is valid (server {config.server_ip}:"
            f"{config.server_port}, name {config.server_name})",
        )
        return config

    # --- 2, 3. certificates ----------------------------------------------------------------------

    def check_certificates(self, config: AgentConfig) -> bool:
        try:
            certs.load_issued(config.cert_file, config.key_file)
            infos = [certs.describe_certificate(p) for p in (config.cert_file, config.ca_cert_file)]
        except FluidityError as exc:
            self.add(
                "certificates",
                FAIL,
                str(exc),
                "run `fluidity certs issue-client NAME` (or fix cert_file/key_file)",
            )
            return False
        now = dt.datetime.now(dt.UTC)
        expired = [i for i in infos if i.expired or i.not_before > now]
        if expired:
            names = ", ".join(
                f"{i.file} (valid {i.not_before:%Y-%m-%d} to {i.not_after:%Y-%m-%d})"
                for i in expired
            )
            self.add(
                "certificates",
                FAIL,
                f"not valid now: {names}",
                "reissue with `fluidity certs issue-client NAME`; check the clock",
            )
            return False
        soon = [i for i in infos if i.expiring_soon]
        if soon:
            names = ", ".join(f"{i.file} ({i.days_left} days left)" for i in soon)
            self.add(
                "certificates",
                WARN,
                f"expiring soon: {names}",
                "reissue before it expires: `fluidity certs issue-client NAME`",
            )
            return True
        left = min(i.days_left for i in infos)
        self.add(
            "certificates",
            PASS,
            f"{config.cert_file} matches {config.key_file}; valid for {left} more days",
        )
        return True

    def check_ca(self, config: AgentConfig) -> None:
        try:
            ca = certs.load_certificate(config.ca_cert_file)
        except FluidityError as exc:
            self.add("CA", FAIL, str(exc), "fix ca_cert_file")
            return
        files = [config.cert_file]
        server_cert = config.ca_cert_file.parent / "server.crt"
        if server_cert.is_file():
            files.append(server_cert)  # `fluidity certs init` leaves it beside the CA
        unsigned = []
        for path in files:
            try:
                certs.load_certificate(path).verify_directly_issued_by(ca)
            except (FluidityError, ValueError, TypeError, InvalidSignature):
                unsigned.append(str(path))
        if unsigned:
            self.add(
                "CA",
                FAIL,
                f"{config.ca_cert_file} did not sign {', '.join(unsigned)}",
                "use the ca.crt of the `fluidity certs init` that issued them",
            )
            return
        also = "" if len(files) > 1 else " (the server's is checked in the TLS step)"
        self.add("CA", PASS, f"{config.ca_cert_file} signed {', '.join(map(str, files))}{also}")

    # --- 4, 5. network ---------------------------------------------------------------------------

    async def check_server_address(self, config: AgentConfig, *, proxied: bool) -> None:
        host, port = str(config.server_ip), config.server_port
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), self.timeout
            )
        except (OSError, TimeoutError) as exc:
            self.add(
                "server address",
                FAIL,
                f"{host} does not resolve: {exc}",
                "check server_ip / --server-ip (`fluidity cloud start` prints it)",
            )
            return
        address = str(infos[0][4][0])
        if proxied:
            self.add(
                "server address",
                SKIP,
                f"{host} resolves to {address}; TCP is tested through the upstream proxy below",
            )
            return
        try:
            sock = await asyncio.wait_for(open_tcp(host, port), self.timeout)
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else describe_oserror(exc)
            self.add(
                "server address",
                FAIL,
                f"{host}:{port} ({address}) does not answer: {reason}",
                "is the server running, the port open in its security group, and no "
                "firewall in between? Behind a corporate proxy, set upstream_proxy",
            )
            return
        sock.close()
        self.add("server address", PASS, f"{host}:{port} ({address}) accepts TCP connections")

    async def check_upstream(self, config: AgentConfig, connector: Any) -> None:
        if connector is None:
            self.add("upstream proxy", SKIP, "none configured: the link connects directly")
            return
        proxy: ProxyEndpoint | None = connector.proxy
        if proxy is None:
            pac = connector.pac
            routes = await pac.routes_for(f"https://{connector.target}/", connector.server_host)
            found = [r for r in routes if isinstance(r, ProxyEndpoint)]
            if connector.pac.last_error:
                self.add(
                    "upstream proxy",
                    FAIL,
                    f"PAC {connector.pac.source}: {connector.pac.last_error}",
                    "fix upstream_pac",
                )
                return
            if not found:
                self.add("upstream proxy", PASS, f"the PAC {connector.pac.source} says DIRECT")
                return
            proxy = connector.with_credentials(found[0])
        assert proxy is not None
        asked = await _probe_schemes(proxy, connector.target, self.timeout)
        try:
            sock = await asyncio.wait_for(connector.connect_through(proxy), self.timeout)
        except (UpstreamError, OSError, TimeoutError) as exc:
            detail = str(exc) or f"no answer within {self.timeout:g}s"
            self.add(
                "upstream proxy",
                FAIL,
                detail,
                "see the message; `fluidity doctor` "
                "retries nothing, the agent retries with backoff",
            )
            return
        sock.close()
        self.add(
            "upstream proxy",
            PASS,
            f"{proxy.address} (from {proxy.source}) opened a "
            f"tunnel to {connector.target}; it asks for: {asked}",
        )

    # --- 6. TLS ----------------------------------------------------------------------------------

    async def check_tls(self, config: AgentConfig, connector: Any) -> bool:
        context = client_context(config.cert_file, config.key_file, config.ca_cert_file)
        try:
            ssl_object = await self._handshake(config, connector, context)
        except ssl.SSLCertVerificationError as exc:
            if exc.verify_code in _NOT_OUR_CA_CODES:
                presented = await self._presented_issuer(config, connector)
                self.add(
                    "TLS",
                    FAIL,
                    "TLS inspection detected: the server's certificate "
                    f"{presented} is not signed by {config.ca_cert_file}",
                    "something on the network re-signs TLS (a corporate firewall or "
                    "antivirus): ask IT to exempt "
                    f"{config.server_ip}:{config.server_port} from TLS inspection "
                    "(SSL bypass); Fluidity's mutual TLS cannot work through it",
                )
            else:
                self.add(
                    "TLS",
                    FAIL,
                    explain_handshake_error(exc),
                    "check server_name and the certificates",
                )
            return False
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.add(
                "TLS",
                FAIL,
                str(exc)
                if not isinstance(exc, ssl.SSLError | TimeoutError)
                else explain_handshake_error(exc),
                "see the checks above",
            )
            return False
        if ssl_object.selected_alpn_protocol() != ALPN_PROTOCOL:
            self.add(
                "TLS",
                FAIL,
                f"the server does not speak {ALPN_PROTOCOL}",
                "is a Fluidity server listening on that port?",
            )
            return False
        self.add(
            "TLS",
            PASS,
            f"{ssl_object.version()} with '{config.server_name}', signed by {config.ca_cert_file}",
        )
        return True

    async def _handshake(
        self, config: AgentConfig, connector: Any, context: ssl.SSLContext
    ) -> ssl.SSLObject:
        assert config.server_ip is not None
        async with asyncio.timeout(self.timeout):
            if connector is not None:
                where: dict[str, Any] = {"sock": await connector()}
            else:
                where = {"host": config.server_ip, "port": config.server_port}
            _, writer = await asyncio.open_connection(
                **where, ssl=context, server_hostname=config.server_name
            )
        ssl_object: ssl.SSLObject = writer.get_extra_info("ssl_object")
        writer.close()
        return ssl_object

    async def _presented_issuer(self, config: AgentConfig, connector: Any) -> str:
        """Subject and issuer of what the far end presents, fetched without verifying it."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            ssl_object = await self._handshake(config, connector, context)
            der = ssl_object.getpeercert(binary_form=True)
        except (OSError, TimeoutError, ssl.SSLError):
            return "(could not be read)"
        if not der:
            return "(none)"
        cert = x509.load_der_x509_certificate(der)
        return (
            f"for '{certs.common_name(cert.subject) or cert.subject.rfc4514_string()}', "
            f"issued by '{certs.common_name(cert.issuer) or cert.issuer.rfc4514_string()}',"
        )

    # --- 7. PING ---------------------------------------------------------------------------------

    async def check_ping(self, config: AgentConfig, connector: Any) -> None:
        assert config.server_ip is not None
        context = client_context(config.cert_file, config.key_file, config.ca_cert_file)
        tunnel_config = config.tunnel.model_copy(
            update={"connections": 1, "reconnect_max_attempts": 1}
        )
        tunnel = Tunnel(
            config.server_ip,
            config.server_port,
            config.server_name,
            context,
            tunnel_config,
            connector=connector,
        )
        tunnel.start()
        try:
            if not await tunnel.wait_connected(self.timeout):
                self.add(
                    "PING",
                    FAIL,
                    f"no link: {tunnel.last_error or 'timed out'}",
                    "the server's log names the reason it refused the link",
                )
                return
            link = tunnel.links[0]
            link.rtt_ms = None
            link.session.send_ping(time.monotonic_ns().to_bytes(8, "big"))
            link.request_flush()
            rtt = await _wait_for_pong(link, self.timeout)
            if rtt is None:
                self.add(
                    "PING",
                    FAIL,
                    "the link is up but the server did not answer a PING",
                    "check the server's log",
                )
                return
            self.add("PING", PASS, f"answered over the link in {rtt:.1f} ms")
        finally:
            await tunnel.stop()


async def _wait_for_pong(link: Any, timeout: float) -> float | None:
    """The link's round-trip time once the PONG is in, or ``None`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    # The link records the PONG in ``rtt_ms`` and has no event for it: look every 10 ms.
    while link.rtt_ms is None and time.monotonic() < deadline and not link.closed.done():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    rtt: float | None = link.rtt_ms
    return rtt


async def _probe_schemes(proxy: Any, target: str, timeout: float) -> str:
    """What the proxy asks for when sent a CONNECT without credentials."""
    request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
    try:
        async with asyncio.timeout(timeout):
            sock = await open_tcp(proxy.host, proxy.port)
            loop = asyncio.get_running_loop()
            try:
                await loop.sock_sendall(sock, request)
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    chunk = await loop.sock_recv(sock, 65536)
                    if not chunk:
                        break
                    data += chunk
            finally:
                sock.close()
    except (OSError, TimeoutError):
        return "(no answer)"
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    if not head[0].startswith(b"HTTP/1.") or b" 407" not in head[0][:13]:
        return "no authentication"
    values = [
        line.split(b":", 1)[1]
        for line in head[1:]
        if line.lower().startswith(b"proxy-authenticate:")
    ]
    return ", ".join(display_scheme(s) for s in parse_challenges(values)) or "(no scheme named)"
