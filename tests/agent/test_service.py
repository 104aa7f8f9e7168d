"""`fluidity service install|uninstall`: systemd units written to a temporary directory only."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fluidity import cli

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "my configs" / "agent.yaml"
    path.parent.mkdir()
    path.write_text("server_ip: 203.0.113.7\n")
    return path


def test_dry_run_prints_the_unit_and_writes_nothing(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    units = tmp_path / "units"
    code = cli.main(
        ["service", "install", "--config", str(config), "--unit-dir", str(units), "--dry-run"]
    )
    out = capsys.readouterr().out
    assert code == 0 and not units.exists()
    assert out.startswith(f"# would write {units / 'fluidity-agent.service'}")
    exec_line = next(line for line in out.splitlines() if line.startswith("ExecStart="))
    assert exec_line == (
        f'ExecStart={sys.executable} -m fluidity agent --config "{config.resolve()}"'
    )
    for line in (
        "Restart=on-failure",
        "RestartSec=5",
        "RestartPreventExitStatus=2",
        "WantedBy=default.target",
        f"WorkingDirectory={Path.cwd()}",
    ):
        assert line in out.splitlines()
    assert "User=" not in out  # a user unit runs as its user


def test_install_and_uninstall_a_system_server_unit(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    units = tmp_path / "units"
    args = ["--server", "--system", "--unit-dir", str(units)]
    assert (
        cli.main(
            [
                "service",
                "install",
                *args,
                "--config",
                str(config),
                "--run-as",
                "fluidity",
                "--workdir",
                str(tmp_path),
            ]
        )
        == 0
    )
    unit = units / "fluidity-server.service"
    text = unit.read_text()
    assert "ExecStart=" in text and " -m fluidity server --config " in text
    assert "User=fluidity" in text.splitlines() and "WantedBy=multi-user.target" in text
    assert f"WorkingDirectory={tmp_path}" in text.splitlines()
    out = capsys.readouterr().out
    assert "systemctl daemon-reload && systemctl enable --now fluidity-server" in out
    # A second install does not overwrite without --force.
    assert cli.main(["service", "install", *args, "--config", str(config)]) == 2
    assert "exists: pass --force" in capsys.readouterr().err
    assert cli.main(["service", "install", *args, "--config", str(config), "--force"]) == 0
    assert cli.main(["service", "uninstall", *args]) == 0
    assert not unit.exists()
    assert "systemctl disable --now fluidity-server" in capsys.readouterr().out
    assert cli.main(["service", "uninstall", *args]) == 2
    assert "nothing to uninstall" in capsys.readouterr().err


def test_a_user_unit_goes_under_the_users_config_directory(
    config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert cli.main(["service", "install", "--agent", "--user", "--config", str(config)]) == 0
    assert (tmp_path / "xdg" / "systemd" / "user" / "fluidity-agent.service").is_file()
    out = capsys.readouterr().out
    assert "systemctl --user daemon-reload" in out and "loginctl enable-linger" in out


def test_a_missing_config_file_is_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        ["service", "install", "--config", str(tmp_path / "nope.yaml"), "--unit-dir", str(tmp_path)]
    )
    assert code == 2 and "not found: the service needs one" in capsys.readouterr().err


def _assert_systemd_accepts(unit: Path) -> None:
    """``systemd-analyze verify`` passes the unit and prints no warning about it."""
    checked = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr
    assert str(unit) not in checked.stdout + checked.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("scope", ["--user", "--system"])
def test_systemd_accepts_the_unit(config: Path, tmp_path: Path, scope: str) -> None:
    units = tmp_path / "units"
    args = ["service", "install", scope, "--config", str(config), "--unit-dir", str(units)]
    assert cli.main([*args, "--run-as", "root"]) == 0
    unit = units / "fluidity-agent.service"
    _assert_systemd_accepts(unit)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_paths_with_spaces_percent_and_dollar_survive_systemds_parsing(tmp_path: Path) -> None:
    workdir = tmp_path / "work dir 100%"
    configs = tmp_path / "cfg $HOME"
    workdir.mkdir()
    configs.mkdir()
    config = configs / "agent 5%.yaml"
    config.write_text("server_ip: 203.0.113.7\n")
    units = tmp_path / "units"
    args = ["--config", str(config), "--workdir", str(workdir), "--unit-dir", str(units)]
    assert cli.main(["service", "install", *args]) == 0
    unit = units / "fluidity-agent.service"
    lines = unit.read_text().splitlines()
    # Path settings are not unquoted by systemd (quotes would make the path "not absolute"):
    # only the % specifier needs escaping. ExecStart words are quoted, with $ and % escaped.
    assert f"WorkingDirectory={str(workdir).replace('%', '%%')}" in lines
    quoted = str(config).replace("%", "%%").replace("$", "$$")
    assert f'ExecStart={sys.executable} -m fluidity agent --config "{quoted}"' in lines
    _assert_systemd_accepts(unit)
