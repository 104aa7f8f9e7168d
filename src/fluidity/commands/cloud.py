"""``fluidity cloud``: deploy Fluidity to AWS and run it there (boto3 only; needs the aws extra).

Region, profile and endpoint come from ``--region``, ``--profile``, ``--endpoint-url`` (before or
after the subcommand) or the usual AWS environment (``AWS_REGION``, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL``, ``~/.aws``). Cluster and service default to ``FLUIDITY_CLUSTER_NAME`` /
``FLUIDITY_SERVICE_NAME``, else ``fluidity`` / ``fluidity-server`` (the templates' defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from fluidity.config import parse_duration
from fluidity.errors import ConfigError


def _aws_arguments(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--region", default=default, help="AWS region (else AWS_REGION)")
    parser.add_argument("--profile", default=default, help="AWS profile (else AWS_PROFILE)")
    parser.add_argument(
        "--endpoint-url",
        default=default,
        help="send every AWS call here (e.g. moto); else AWS_ENDPOINT_URL",
    )


def _service_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cluster",
        default=os.environ.get("FLUIDITY_CLUSTER_NAME", "fluidity"),
        help="ECS cluster (FLUIDITY_CLUSTER_NAME, default fluidity)",
    )
    parser.add_argument(
        "--service",
        default=os.environ.get("FLUIDITY_SERVICE_NAME", "fluidity-server"),
        help="ECS service (FLUIDITY_SERVICE_NAME, default fluidity-server)",
    )


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers: Any) -> None:
    cloud: argparse.ArgumentParser = subparsers.add_parser(
        "cloud",
        help="deploy to AWS Fargate and start, stop, watch the server there",
        description="Deploy Fluidity to AWS (CloudFormation) and operate the Fargate server. "
        "See docs/fargate.md.",
    )
    _aws_arguments(cloud, suppress=False)
    commands = cloud.add_subparsers(dest="cloud_command", metavar="SUBCOMMAND", required=True)

    def sub(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(
            name, help=help_text, description=help_text
        )
        _aws_arguments(parser, suppress=True)
        return parser

    deploy = sub("deploy", "create or update the Fargate and Lambda stacks, streaming events")
    _stack_arguments(deploy)
    deploy.add_argument(
        "--params",
        type=Path,
        default=None,
        help="Fargate parameters file (default <template-dir>/params.json)",
    )
    deploy.add_argument(
        "--lambda-params",
        type=Path,
        default=None,
        help="Lambda parameters file (default <template-dir>/lambda-params.json)",
    )
    deploy.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="override a Fargate parameter (repeatable)",
    )
    deploy.add_argument(
        "--lambda-param",
        action="append",
        metavar="KEY=VALUE",
        help="override a Lambda parameter (repeatable)",
    )
    deploy.add_argument(
        "--poll-interval",
        type=_duration,
        default=5.0,
        help="seconds between stack status polls (default 5s)",
    )
    deploy.add_argument(
        "--timeout",
        type=_duration,
        default=1800.0,
        help="give up waiting for a stack after this long (default 30m)",
    )
    deploy.set_defaults(handler=_deploy)

    destroy = sub("destroy", "delete the Lambda and Fargate stacks (asks for confirmation)")
    _stack_arguments(destroy)
    destroy.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    destroy.add_argument("--poll-interval", type=_duration, default=5.0, help=argparse.SUPPRESS)
    destroy.add_argument("--timeout", type=_duration, default=1800.0, help=argparse.SUPPRESS)
    destroy.set_defaults(handler=_destroy)

    package = sub("package", "build the Lambda zip; with --bucket, upload it to S3")
    package.add_argument("--output", type=Path, default=None, help="also write the zip here")
    package.add_argument("--bucket", help="S3 bucket to upload to (created private if missing)")
    package.add_argument("--key", help="S3 key (default fluidity/lambda-<sha256>.zip)")
    package.set_defaults(handler=_package)

    certs = sub("certs", "certificates in AWS Secrets Manager")
    certs_commands = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    push = certs_commands.add_parser(
        "push",
        help="write ./certs/server.crt, server.key and ca.crt into the secret",
        description="Validate the server certificate, key and CA and store them as the JSON "
        "secret the server reads with cert_source: secretsmanager.",
    )
    _aws_arguments(push, suppress=True)
    push.add_argument("--dir", type=Path, default=Path("certs"), help="certificate directory")
    push.add_argument(
        "--secret-name",
        default="fluidity/certificates",
        help="secret name (CertSecretName in fargate.yaml)",
    )
    push.set_defaults(handler=_certs_push)

    start = sub("start", "start the server (desired count 1), print its IP and the agent command")
    _service_arguments(start)
    start.add_argument(
        "--poll-interval", type=_duration, default=3.0, help="seconds between polls (default 3s)"
    )
    start.add_argument(
        "--timeout", type=_duration, default=300.0, help="give up after this long (default 5m)"
    )
    start.add_argument(
        "--agent-config",
        default="configs/agent.yaml",
        help="agent config file shown in the agent command line",
    )
    start.set_defaults(handler=_start)

    stop = sub("stop", "stop the server (desired count 0)")
    _service_arguments(stop)
    stop.add_argument("--wait", action="store_true", help="wait until the task has stopped")
    stop.add_argument("--poll-interval", type=_duration, default=3.0, help=argparse.SUPPRESS)
    stop.set_defaults(handler=_stop)

    status = sub("status", "state, IP, uptime, last activity and this month's cost estimate")
    _service_arguments(status)
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    status.set_defaults(handler=_status)

    logs = sub("logs", "print (and follow) the server's CloudWatch logs")
    logs.add_argument("--log-group", default="/fluidity/server", help="LogGroupName")
    logs.add_argument("--since", type=_duration, default=600.0, help="how far back (default 10m)")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    logs.set_defaults(handler=_logs)


def _stack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", choices=["fargate", "lambda"], help="one stack only")
    parser.add_argument(
        "--template-dir",
        type=Path,
        default=Path("deployments/cloudformation"),
        help="directory of fargate.yaml and lambda.yaml",
    )
    parser.add_argument("--fargate-stack", default="fluidity-fargate", help="server stack name")
    parser.add_argument("--lambda-stack", default="fluidity-lambda", help="control stack name")


def _target(args: argparse.Namespace) -> Any:
    from fluidity.cloud.aws import AwsTarget

    return AwsTarget(args.region, args.profile, args.endpoint_url)


def _console() -> Any:
    from rich.console import Console

    # soft_wrap: the IP and agent command lines are copied and parsed; never wrap them.
    return Console(soft_wrap=True, highlight=False)


def _plan(args: argparse.Namespace) -> Any:
    from fluidity.cloud.deploy import DeployPlan
    from fluidity.cloud.stacks import parse_overrides

    directory: Path = args.template_dir
    return DeployPlan(
        template_dir=directory,
        fargate_stack=args.fargate_stack,
        lambda_stack=args.lambda_stack,
        fargate_params=getattr(args, "params", None) or directory / "params.json",
        lambda_params=getattr(args, "lambda_params", None) or directory / "lambda-params.json",
        fargate_overrides=parse_overrides(getattr(args, "param", None)),
        lambda_overrides=parse_overrides(getattr(args, "lambda_param", None)),
        only=args.only,
    )


def _deployer(args: argparse.Namespace, console: Any) -> Any:
    from fluidity.cloud.stacks import StackDeployer

    return StackDeployer(
        _target(args), console, poll_interval=args.poll_interval, timeout=args.timeout
    )


def _deploy(args: argparse.Namespace) -> int:
    from fluidity.cloud.deploy import deploy

    console = _console()
    results = deploy(_target(args), _plan(args), console, _deployer(args, console))
    for result in results.values():
        for key, value in sorted(result.outputs.items()):
            console.print(f"  {result.name}.{key} = {value}")
    lambda_outputs = next((r.outputs for r in results.values() if "ApiKeyId" in r.outputs), None)
    if lambda_outputs:
        console.print(
            "Agent API key value: aws apigateway get-api-key --include-value --query value "
            f"--output text --api-key {lambda_outputs['ApiKeyId']}"
        )
    console.print("Next: `fluidity cloud certs push` (once), then `fluidity cloud start`.")
    return 0


def _destroy(args: argparse.Namespace) -> int:
    from fluidity.cloud.deploy import destroy

    plan = _plan(args)
    names = [
        n
        for n, which in ((plan.lambda_stack, "lambda"), (plan.fargate_stack, "fargate"))
        if plan.only in (None, which)
    ]
    if not args.yes:
        if not sys.stdin.isatty():
            raise ConfigError("destroy needs --yes when there is no terminal to confirm on")
        answer = input(
            f"Delete the stacks {', '.join(names)}? The certificate secret and the "
            "code bucket are kept. Type 'destroy' to continue: "
        )
        if answer.strip() != "destroy":
            print("Nothing deleted.")
            return 1
    console = _console()
    deleted = destroy(plan, _deployer(args, console))
    console.print(f"Deleted: {', '.join(deleted) if deleted else 'nothing (no such stacks)'}")
    return 0


def _package(args: argparse.Namespace) -> int:
    from fluidity.cloud.package import build_package, upload_package

    package = build_package()
    print(f"Lambda package: {len(package.data)} bytes, sha256 {package.sha256}")
    for name in package.files:
        print(f"  {name}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_bytes(package.data)
        print(f"Wrote {args.output}")
    if args.bucket:
        key = args.key or package.default_key
        upload_package(_target(args), package, args.bucket, key)
        print(f"Uploaded s3://{args.bucket}/{key} (CodeBucket={args.bucket} CodeKey={key})")
    return 0


def _certs_push(args: argparse.Namespace) -> int:
    from fluidity.cloud.secrets import push_certificates

    result = push_certificates(_target(args), args.dir, args.secret_name)
    verb = "Created" if result.created else "Updated"
    print(
        f"{verb} secret {result.secret} (version {result.version}) from {args.dir}/server.crt, "
        "server.key and ca.crt; no key material was printed."
    )
    return 0


def _service(args: argparse.Namespace) -> Any:
    from fluidity.cloud.service import ServiceRef

    return ServiceRef(args.cluster, args.service)


def _start(args: argparse.Namespace) -> int:
    from fluidity.cloud.service import start

    start(
        _target(args),
        _service(args),
        _console(),
        poll_interval=args.poll_interval,
        timeout=args.timeout,
        agent_config=args.agent_config,
    )
    return 0


def _stop(args: argparse.Namespace) -> int:
    from fluidity.cloud.service import stop

    stop(
        _target(args), _service(args), _console(), wait=args.wait, poll_interval=args.poll_interval
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    from fluidity.cloud.service import format_status, status

    report = status(_target(args), _service(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(format_status(report)))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from fluidity.cloud.logs import tail

    printed = tail(_target(args), args.log_group, args.since, print, follow=args.follow)
    if not printed:
        print(f"(no events in {args.log_group} in the last {args.since:g}s)", file=sys.stderr)
    return 0
