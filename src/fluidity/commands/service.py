"""``fluidity service install|uninstall``: run the agent (or the server) as a systemd service.

``install`` writes ``fluidity-agent.service`` (or ``fluidity-server.service``) for the user's
systemd (``~/.config/systemd/user``, the default) or the system's (``/etc/systemd/system``,
``--system``, run as root), then prints the ``systemctl`` lines that enable and start it. The unit
runs this Python's ``-m fluidity`` with the absolute path of ``--config``, in the current directory
(relative certificate paths in the config are read from there), restarts on failure after 5 s, and
does not restart on exit status 2 (a configuration error: restarting would not fix it).
``--dry-run`` prints the unit and where it would go, and writes nothing. Nothing here runs
``systemctl`` itself. Windows has no systemd: see docs/agent.md for what to use there.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from fluidity.errors import FluidityError

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")


def user_unit_dir(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return Path(base) / "systemd" / "user"


def _quote(value: str) -> str:
    """Quote one ExecStart word the way systemd reads it: double quotes with backslash escapes,
    ``%%`` for a literal ``%`` (specifiers) and ``$$`` for a literal ``$`` (variables)."""
    if value and all(c.isalnum() or c in "/._-:=@+," for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def _path_setting(path: Path) -> str:
    """An absolute path as the value of a path setting (``WorkingDirectory=``): systemd takes it
    unquoted (quotes would make it "not absolute"), expanding only ``%`` specifiers."""
    text = str(path)
    if "\n" in text:
        raise FluidityError(f"{text!r}: a systemd unit cannot name a path with a line break")
    return text.replace("%", "%%")


def render_unit(
    role: str,
    *,
    config: Path,
    workdir: Path,
    python: str,
    system: bool,
    run_as: str | None = None,
) -> str:
    """The text of the unit file for ``role`` ("agent" or "server")."""
    command = " ".join(_quote(w) for w in (python, "-m", "fluidity", role, "--config", str(config)))
    what = (
        "local proxy (HTTP and SOCKS5) over a mutual-TLS tunnel"
        if role == "agent"
        else "tunnel server: accepts agents over mutual TLS and dials their targets"
    )
    user = f"User={run_as}\n" if system and run_as else ""
    wanted_by = "multi-user.target" if system else "default.target"
    return f"""# Written by `fluidity service install --{role}` (uninstall removes it).
[Unit]
Description=Fluidity {role}: {what}
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
{user}WorkingDirectory={_path_setting(workdir)}
ExecStart={command}
Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=5
# Exit status 2 is a configuration error: fix the config, then `systemctl restart`.
RestartPreventExitStatus=2
# SIGTERM starts a graceful stop (shutdown_grace, 10 s by default).
TimeoutStopSec=30
NoNewPrivileges=yes
PrivateTmp=yes

[Install]
WantedBy={wanted_by}
"""


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "service",
        help="install or remove a systemd service for the agent or the server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="service_action", metavar="ACTION", required=True)
    for action in ("install", "uninstall"):
        sub = actions.add_parser(action, help=f"{action} the systemd unit")
        role = sub.add_mutually_exclusive_group()
        role.add_argument(
            "--agent", dest="role", action="store_const", const="agent", help="the agent (default)"
        )
        role.add_argument(
            "--server", dest="role", action="store_const", const="server", help="the server"
        )
        scope = sub.add_mutually_exclusive_group()
        scope.add_argument(
            "--user",
            dest="system",
            action="store_false",
            help="the user's systemd (default; no root needed)",
        )
        scope.add_argument(
            "--system",
            dest="system",
            action="store_true",
            help="the system's systemd (/etc/systemd/system; run as root)",
        )
        sub.add_argument("--dry-run", action="store_true", help="print, write nothing")
        sub.add_argument(
            "--unit-dir",
            type=Path,
            default=None,
            help="write the unit here instead of systemd's directory",
        )
        if action == "install":
            sub.add_argument(
                "--config", "-c", type=Path, required=True, help="config file the service runs with"
            )
            sub.add_argument(
                "--workdir",
                type=Path,
                default=None,
                help="working directory (default: the current one)",
            )
            sub.add_argument(
                "--run-as",
                default=None,
                help="user a --system service runs as (default: $SUDO_USER, else the current user)",
            )
            sub.add_argument("--force", action="store_true", help="replace an existing unit")
        sub.set_defaults(handler=main, role="agent", system=False)


def main(args: argparse.Namespace) -> int:
    role: str = args.role
    unit_name = f"fluidity-{role}.service"
    directory: Path = args.unit_dir or (SYSTEM_UNIT_DIR if args.system else user_unit_dir())
    path = directory / unit_name
    ctl = "systemctl" if args.system else "systemctl --user"
    journal = "journalctl" if args.system else "journalctl --user"
    if args.service_action == "uninstall":
        return _uninstall(path, unit_name, ctl, dry_run=args.dry_run)
    config = args.config.expanduser().resolve()
    if not config.is_file():
        raise FluidityError(f"config file {config} not found: the service needs one (--config)")
    workdir = (args.workdir or Path.cwd()).expanduser().resolve()
    run_as = args.run_as or os.environ.get("SUDO_USER") or getpass.getuser()
    text = render_unit(
        role,
        config=config,
        workdir=workdir,
        python=sys.executable,
        system=args.system,
        run_as=run_as,
    )
    if args.dry_run:
        print(f"# would write {path}")
        print(text, end="")
        return 0
    if path.exists() and not args.force:
        raise FluidityError(f"{path} exists: pass --force to replace it")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        hint = " (use sudo for --system)" if args.system else ""
        raise FluidityError(f"cannot write {path}: {exc.strerror}{hint}") from None
    name = shlex.quote(unit_name.removesuffix(".service"))
    print(f"wrote {path}")
    print(
        f"start it now and at every boot/login:\n  {ctl} daemon-reload && {ctl} enable --now {name}"
    )
    print(f"see its log:\n  {journal} -u {name} -f")
    if not args.system:
        print("a user service stops at logout unless lingering is on:\n  loginctl enable-linger")
    return 0


def _uninstall(path: Path, unit_name: str, ctl: str, *, dry_run: bool) -> int:
    name = unit_name.removesuffix(".service")
    if not path.exists():
        raise FluidityError(f"{path} not found: nothing to uninstall (--user/--system/--unit-dir?)")
    if dry_run:
        print(f"# would remove {path}")
        return 0
    try:
        path.unlink()
    except OSError as exc:
        raise FluidityError(f"cannot remove {path}: {exc.strerror}") from None
    print(f"removed {path}")
    print(f"stop it and forget it:\n  {ctl} disable --now {name}; {ctl} daemon-reload")
    return 0
