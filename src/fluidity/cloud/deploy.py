"""``fluidity cloud deploy`` and ``destroy``: both stacks in order, the Lambda package between.

Deploy: ``fargate.yaml`` with ``params.json`` (the server), then the Lambda zip uploaded to
``CodeBucket`` under a content-hashed key, then ``lambda.yaml`` with ``lambda-params.json`` (the
control plane) pointed at the server stack's cluster and service. Destroy: the other way round.
The certificate secret and the code bucket are kept (they are not part of the stacks).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from fluidity.cloud.aws import AwsTarget
from fluidity.cloud.package import build_package, upload_package
from fluidity.cloud.stacks import StackDeployer, StackResult, check_placeholders, load_parameters
from fluidity.errors import ConfigError

TEMPLATE_DIR = Path("deployments/cloudformation")
FARGATE_STACK = "fluidity-fargate"
LAMBDA_STACK = "fluidity-lambda"


@dataclass(frozen=True)
class DeployPlan:
    """What to deploy; paths are relative to the working directory (the repository root)."""

    template_dir: Path = TEMPLATE_DIR
    fargate_stack: str = FARGATE_STACK
    lambda_stack: str = LAMBDA_STACK
    fargate_params: Path = TEMPLATE_DIR / "params.json"
    lambda_params: Path = TEMPLATE_DIR / "lambda-params.json"
    fargate_overrides: Mapping[str, str] = field(default_factory=dict)
    lambda_overrides: Mapping[str, str] = field(default_factory=dict)
    only: str | None = None
    """``"fargate"`` or ``"lambda"`` to deploy one stack; ``None`` for both."""


def deploy(
    target: AwsTarget, plan: DeployPlan, console: Console, deployer: StackDeployer
) -> dict[str, StackResult]:
    """Deploy the stacks of ``plan``; return their results by stack name."""
    results: dict[str, StackResult] = {}
    if plan.only in (None, "fargate"):
        parameters = {**load_parameters(plan.fargate_params), **plan.fargate_overrides}
        check_placeholders(parameters, str(plan.fargate_params))
        results[plan.fargate_stack] = deployer.deploy(
            plan.fargate_stack, plan.template_dir / "fargate.yaml", parameters
        )
    if plan.only in (None, "lambda"):
        parameters = {**load_parameters(plan.lambda_params), **plan.lambda_overrides}
        server = deployer.outputs(plan.fargate_stack)
        for key in ("ClusterName", "ServiceName"):  # the control plane must drive this server
            if key in server and key not in plan.lambda_overrides:
                parameters[key] = server[key]
        bucket = parameters.get("CodeBucket")
        if not bucket:
            raise ConfigError(f"{plan.lambda_params}: CodeBucket is required (an S3 bucket name)")
        check_placeholders(parameters, str(plan.lambda_params))
        package = build_package()
        key = plan.lambda_overrides.get("CodeKey") or package.default_key
        console.print(
            f"Uploading the Lambda package ({len(package.data)} bytes, {len(package.files)} "
            f"files) to s3://{bucket}/{key} ..."
        )
        upload_package(target, package, bucket, key)
        parameters["CodeKey"] = key
        results[plan.lambda_stack] = deployer.deploy(
            plan.lambda_stack, plan.template_dir / "lambda.yaml", parameters
        )
    return results


def destroy(plan: DeployPlan, deployer: StackDeployer) -> list[str]:
    """Delete the Lambda stack, then the Fargate stack; return the names deleted."""
    deleted: list[str] = []
    if plan.only in (None, "lambda") and deployer.delete(plan.lambda_stack):
        deleted.append(plan.lambda_stack)
    if plan.only in (None, "fargate") and deployer.delete(plan.fargate_stack):
        deleted.append(plan.fargate_stack)
    return deleted
