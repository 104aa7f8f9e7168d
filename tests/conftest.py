"""Fixtures shared by all test suites: a PKI made once per session, free ports, log capture."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from fluidity.certs import PkiPaths, init_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    """A CA, server and client certificate (ECDSA P-256) in a session-wide temporary directory."""
    return init_pki(tmp_path_factory.mktemp("pki") / "certs")


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    """Run async tests on uvloop, the loop the CLI uses, when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.DefaultEventLoopPolicy()
    return uvloop.EventLoopPolicy()
