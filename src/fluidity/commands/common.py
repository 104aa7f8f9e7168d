"""Argument helpers shared by the long-running commands (agent, server)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fluidity.config import load_config
from fluidity.logs import setup_logging


def add_common_arguments(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help=f"YAML config file (e.g. {default_config}); without it, built-in defaults apply",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=None,
        help="log level (overrides log_level and FLUIDITY_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=None,
        help="log format: text lines or JSON lines (overrides log_format)",
    )


def load_and_log(model: type[Any], args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    """Load the role's config (file < env < flags) and set up logging from it."""
    overrides = {"log_level": args.log_level, "log_format": args.log_format, **overrides}
    config = load_config(model, args.config, overrides=overrides)
    setup_logging(config.log_level, config.log_format)
    return config
