"""``fluidity certs``: create the private CA and certificates, issue more clients, list them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fluidity import certs, crl

DEFAULT_DIR = Path("certs")


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    """Register ``fluidity certs`` and its sub-commands init, issue-client, revoke and show."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "certs",
        help="create and inspect the CA, server and client certificates",
        description="Create and inspect the private CA and the certificates for mutual TLS.",
    )
    actions = parser.add_subparsers(dest="certs_command", metavar="ACTION", required=True)

    init = actions.add_parser(
        "init",
        help="create a CA, a server and a client certificate",
        description=(
            "Create ca.crt/ca.key, server.crt/server.key and client.crt/client.key. The server "
            "certificate is valid for the server name, localhost, 127.0.0.1 and every --san."
        ),
    )
    _add_dir(init)
    init.add_argument(
        "--server-name",
        default=certs.DEFAULT_SERVER_NAME,
        help="DNS name the agent checks on the server certificate (default: %(default)s)",
    )
    init.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="extra DNS name or IP address for the server certificate (repeatable)",
    )
    _add_key_type(init)
    _add_days(init)
    init.add_argument(
        "--ca-days",
        type=int,
        default=certs.DEFAULT_CA_DAYS,
        help="CA validity in days (default: %(default)s)",
    )
    init.add_argument(
        "--client-name",
        default=certs.DEFAULT_CLIENT_NAME,
        help="common name of the client certificate (default: %(default)s)",
    )
    _add_force(init)
    init.set_defaults(handler=run_init)

    issue = actions.add_parser(
        "issue-client",
        help="issue NAME.crt/NAME.key signed by the existing CA",
        description="Issue another client certificate (CN = NAME) signed by ca.crt/ca.key.",
    )
    issue.add_argument("name", metavar="NAME", help="client name: letters, digits, '.', '_', '-'")
    _add_dir(issue)
    _add_key_type(issue)
    _add_days(issue)
    _add_force(issue)
    issue.set_defaults(handler=run_issue_client)

    revoke = actions.add_parser(
        "revoke",
        help="revoke NAME.crt (a lost laptop): add it to crl.pem",
        description=(
            "Add the certificate NAME.crt (or --serial) to crl.pem in the directory, signed by "
            "the CA. Copy crl.pem to the server (crl_file): a running server reloads it within "
            "tls_reload_interval or on SIGHUP, refuses that agent and closes its open link."
        ),
    )
    revoke.add_argument("name", metavar="NAME", nargs="?", help="certificate name, e.g. laptop-2")
    revoke.add_argument(
        "--serial",
        type=lambda text: int(text, 0),
        default=None,
        help="revoke by serial number (e.g. 0x1f...) when NAME.crt is gone",
    )
    _add_dir(revoke)
    revoke.set_defaults(handler=run_revoke)

    show = actions.add_parser(
        "show",
        help="list the certificates in the directory and when they expire",
        description="Show subject, SANs, issuer, key type and expiry of every .crt file.",
    )
    _add_dir(show)
    show.set_defaults(handler=run_show)
    return parser


def run_init(args: argparse.Namespace) -> int:
    """Handle ``fluidity certs init``."""
    paths = certs.init_pki(
        args.dir,
        server_name=args.server_name,
        extra_sans=args.san,
        key_type=args.key_type,
        leaf_days=args.days,
        ca_days=args.ca_days,
        client_name=args.client_name,
        force=args.force,
    )
    console = Console()
    console.print(f"Created a CA, a server and a client certificate in {paths.directory}:")
    for path in paths.files():
        console.print(f"  {path}", highlight=False)
    console.print(
        "Keep ca.key offline if you can: whoever holds it can mint certificates that both "
        "sides trust. Copy ca.crt, server.crt and server.key to the server; the agent needs "
        "ca.crt, client.crt and client.key."
    )
    return 0


def run_issue_client(args: argparse.Namespace) -> int:
    """Handle ``fluidity certs issue-client NAME``."""
    cert_path, key_path = certs.issue_client(
        args.dir, args.name, key_type=args.key_type, days=args.days, force=args.force
    )
    Console().print(f"Issued {cert_path} and {key_path} for client {args.name!r}.", highlight=False)
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    """Handle ``fluidity certs revoke NAME``."""
    path, serial, added = crl.revoke(args.dir, args.name, serial=args.serial)
    what = args.name or f"serial {serial:#x}"
    verb = "Revoked" if added else "Already revoked:"
    Console().print(
        f"{verb} {what} (serial {serial:#x}); {path} is signed and up to date. Copy it to the "
        "server's crl_file: it is reloaded within tls_reload_interval or on SIGHUP.",
        highlight=False,
    )
    return 0


def run_show(args: argparse.Namespace) -> int:
    """Handle ``fluidity certs show``."""
    infos = certs.describe_certificates(args.dir)
    console = Console()
    if not infos:
        console.print(f"No .crt files in {args.dir}: run `fluidity certs init --dir {args.dir}`.")
        return 0
    table = Table(title=f"Certificates in {args.dir}")
    table.add_column("File", no_wrap=True)
    for column in ("Subject CN", "SANs", "Issuer CN", "Key"):
        table.add_column(column, overflow="fold")
    table.add_column("Not after", no_wrap=True)
    table.add_column("Days left", justify="right")
    for info in infos:
        if info.expired:
            days = "[bold red]EXPIRED[/]"
        elif info.expiring_soon:
            days = f"[yellow]{info.days_left} (< {certs.EXPIRY_WARNING_DAYS})[/]"
        else:
            days = str(info.days_left)
        table.add_row(
            info.file.name,
            info.subject_cn + (" (CA)" if info.is_ca else ""),
            "\n".join(info.sans) or "-",
            info.issuer_cn,
            info.key_type,
            info.not_after.strftime("%Y-%m-%d"),
            days,
        )
    console.print(table)
    return 0


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help="certificate directory (default: ./%(default)s)",
    )


def _add_key_type(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-type",
        choices=certs.KEY_TYPES,
        default=certs.DEFAULT_KEY_TYPE,
        help="key algorithm (default: %(default)s; rsa4096 is slower and larger)",
    )


def _add_days(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--days",
        type=int,
        default=certs.DEFAULT_LEAF_DAYS,
        help=f"certificate validity in days, 1 to {certs.MAX_DAYS} (default: %(default)s)",
    )


def _add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force", action="store_true", help="overwrite existing certificate and key files"
    )
