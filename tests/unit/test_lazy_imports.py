"""The long-running agent and server never import cryptography (about 10 MiB of RSS each); it is
loaded only to make certificates, to explain a file that ssl refused, or for a CRL."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fluidity.tls import _first_common_name

_CHECK = """
import sys
from fluidity.cli import build_parser
build_parser({command!r})
import fluidity.agent.app, fluidity.server.app
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('cryptography', 'rich', 'boto3'))
print(heavy)
"""


@pytest.mark.parametrize("command", ["agent", "server"])
def test_agent_and_server_processes_do_not_import_cryptography(command: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHECK.format(command=command)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.strip() == "[]"


def test_peer_name_from_the_certificate_ssl_decoded() -> None:
    subject = ((("organizationName", "Fluidity"),), (("commonName", "laptop-1"),))
    assert _first_common_name({"subject": subject}) == "laptop-1"
    two = ((("commonName", "first"),), (("commonName", "second"),))
    assert _first_common_name({"subject": two}) == "first"
    assert _first_common_name({"subject": ((("organizationName", "x"),),)}) == ""
    assert _first_common_name({}) is None  # not verified: ssl decoded nothing
