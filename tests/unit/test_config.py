"""Configuration: units, ${ENV} substitution, precedence, and errors that name file and key."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from fluidity.agent.tunnel import Tunnel
from fluidity.commands.config import reference_markdown
from fluidity.config import AgentConfig, ServerConfig, load_config, parse_duration, parse_size
from fluidity.errors import ConfigError
from fluidity.server.listener import Server


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("5m", 300),
        ("250ms", 0.25),
        ("1h", 3600),
        ("1.5s", 1.5),
        (7, 7),
        ("2d", 172800),
    ],
)
def test_durations_parse_to_seconds(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("256KiB", 262144), ("1MiB", 1048576), ("64KB", 64000), (4096, 4096), ("2 GiB", 2 << 30)],
)
def test_sizes_parse_to_bytes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["abc", "-5s", "5 parsecs", True])
def test_bad_durations_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_file_values_env_substitution_and_units(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'server_ip: "${SERVER}"\nserver_name: "${NAME:-fluidity-server}"\n'
        'tunnel: {reconnect_max: "1m", stream_window: "1MiB"}\n',
    )
    config = load_config(AgentConfig, path, environ={"SERVER": "203.0.113.7"})
    assert config.server_ip == "203.0.113.7"
    assert config.server_name == "fluidity-server"
    assert config.tunnel.reconnect_max == 60.0
    assert config.tunnel.stream_window == 1 << 20


def test_precedence_is_defaults_file_env_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "log_level: warning\nlocal_proxy_port: 9000\nserver_port: 9443\n")
    env = {"FLUIDITY_LOG_LEVEL": "debug", "FLUIDITY_LOCAL_PROXY_PORT": "9100"}
    config = load_config(
        AgentConfig, path, environ=env, overrides={"local_proxy_port": 9200, "server_ip": None}
    )
    assert config.log_level == "debug"  # env beats file
    assert config.local_proxy_port == 9200  # flag beats env
    assert config.server_port == 9443  # file beats default
    assert config.server_ip is None  # an unset flag overrides nothing


def test_nested_env_override_uses_double_underscore(tmp_path: Path) -> None:
    config = load_config(
        AgentConfig, None, environ={"FLUIDITY_TUNNEL__CONNECTIONS": "3", "FLUIDITY_NOPE": "x"}
    )
    assert config.tunnel.connections == 3


def test_unknown_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "servr_ip: 1.2.3.4\n")
    with pytest.raises(ConfigError) as info:
        load_config(AgentConfig, path, environ={})
    message = str(info.value)
    assert str(path) in message
    assert "servr_ip: unknown key" in message
    assert "did you mean 'server_ip'" in message


def test_bad_value_names_the_nested_key_and_expectation(tmp_path: Path) -> None:
    path = write(tmp_path, "tunnel:\n  reconnect_max: soon\n")
    with pytest.raises(ConfigError, match=r"tunnel\.reconnect_max: expected a duration"):
        load_config(AgentConfig, path, environ={})


@pytest.mark.parametrize(
    ("model", "text", "message"),
    [
        (AgentConfig, "tunnel:\n  stream_window: 100\n",
         r"tunnel\.stream_window: a stream window must be 1 KiB to 2 GiB, got 100 bytes"),
        (AgentConfig, "tunnel:\n  max_stream_window: 3GiB\n",
         r"tunnel\.max_stream_window: a window limit must be 0 \(no growth\) to 2 GiB, got 3"),
        (ServerConfig, "max_frame_size: 2MiB\n",
         r"max_frame_size: a frame size must be 1 KiB to 1 MiB, got 2097152 bytes"),
        (ServerConfig, "stream_window_budget: -1\n", r"stream_window_budget: a size cannot be"),
    ],
)  # fmt: skip
def test_window_and_frame_sizes_out_of_range_are_explained(
    tmp_path: Path, model: type[AgentConfig] | type[ServerConfig], text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(model, write(tmp_path, text), environ={})


def test_window_growth_settings_reach_the_sessions() -> None:
    config = AgentConfig.model_validate(
        {"tunnel": {"stream_window": "512KiB", "max_stream_window": "4MiB",
                    "stream_window_budget": "8MiB"}}
    )  # fmt: skip
    tunnel = Tunnel("127.0.0.1", 1, "server", ssl.create_default_context(), config.tunnel)
    assert tunnel.settings.initial_window == 512 * 1024
    assert tunnel.settings.max_window == 4 * 1024 * 1024
    assert tunnel.settings.window_growth_budget == 8 * 1024 * 1024
    assert tunnel.settings.tunes_windows


def test_server_window_growth_settings_reach_the_sessions() -> None:
    config = ServerConfig.model_validate({"max_stream_window": 0, "stream_window_budget": "1MiB"})
    listener = Server(config, ssl.create_default_context())
    assert listener.session_settings.window_growth_budget == 1024 * 1024
    assert not listener.session_settings.tunes_windows  # max_stream_window 0: fixed windows


def test_missing_env_variable_without_default_is_explained(tmp_path: Path) -> None:
    path = write(tmp_path, 'server_ip: "${FLUIDITY_TEST_UNSET_VAR}"\n')
    with pytest.raises(ConfigError, match="FLUIDITY_TEST_UNSET_VAR is not set"):
        load_config(AgentConfig, path, environ={})


def test_invalid_yaml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(ServerConfig, write(tmp_path, "a: [1, 2\n"), environ={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(ServerConfig, tmp_path / "missing.yaml", environ={})


def test_empty_server_ip_means_unset(tmp_path: Path) -> None:
    path = write(tmp_path, 'server_ip: "${FLUIDITY_SERVER_IP:-}"\n')
    assert load_config(AgentConfig, path, environ={}).server_ip is None


@pytest.mark.parametrize("name", ["agent.yaml", "agent.local.yaml"])
def test_shipped_agent_configs_are_valid(repo_root: Path, name: str) -> None:
    load_config(AgentConfig, repo_root / "configs" / name, environ={})


@pytest.mark.parametrize("name", ["server.yaml", "server.local.yaml"])
def test_shipped_server_configs_are_valid(repo_root: Path, name: str) -> None:
    config = load_config(ServerConfig, repo_root / "configs" / name, environ={})
    assert config.listen_port == 8443


def test_docs_configuration_reference_is_generated_from_the_models(repo_root: Path) -> None:
    documented = (repo_root / "docs" / "configuration.md").read_text()
    assert documented == reference_markdown(), (
        "run: fluidity config reference > docs/configuration.md"
    )
