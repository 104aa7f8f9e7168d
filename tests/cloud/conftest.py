"""Fixtures for the deployment tests: moto on loopback (tests/awsfixtures.py), parsed templates.

The moto fixtures are imported, not listed in ``pytest_plugins``: pytest only honours that in the
top-level conftest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.awsfixtures import aws_env, moto_endpoint  # noqa: F401 - fixtures used by the tests
from tests.cloud.cfn import load_template

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "deployments" / "cloudformation"


@pytest.fixture(scope="session")
def fargate_template() -> dict[str, Any]:
    return load_template(TEMPLATES / "fargate.yaml")


@pytest.fixture(scope="session")
def lambda_template() -> dict[str, Any]:
    return load_template(TEMPLATES / "lambda.yaml")
