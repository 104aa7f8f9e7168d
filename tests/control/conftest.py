"""Fixtures for the control-plane tests: moto on loopback (see tests/awsfixtures.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fluidity.control import lambdas
from tests.awsfixtures import (  # the fixtures are imported to register them here
    FargateService,
    aws_client,
    aws_env,
    create_fargate_service,
    moto_endpoint,
)

__all__ = ["aws_env", "moto_endpoint"]

API_KEY = "correct-horse-battery-staple"


@pytest.fixture
def service(aws_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FargateService]:
    """A stopped Fargate service in moto and the Lambda environment that names it."""
    svc = create_fargate_service(aws_env)
    monkeypatch.setenv("CLUSTER_NAME", svc.cluster)
    monkeypatch.setenv("SERVICE_NAME", svc.service)
    monkeypatch.setenv("API_KEY", API_KEY)
    for name in ("API_KEY_SECRET_ARN", "IDLE_THRESHOLD", "STARTUP_GRACE", "METRIC_LOOKBACK"):
        monkeypatch.delenv(name, raising=False)
    lambdas._reset_for_tests()
    yield svc
    lambdas._reset_for_tests()


def desired_count(svc: FargateService) -> int:
    ecs = aws_client("ecs", svc.endpoint)
    found = ecs.describe_services(cluster=svc.cluster, services=[svc.service])["services"]
    return int(found[0]["desiredCount"])
