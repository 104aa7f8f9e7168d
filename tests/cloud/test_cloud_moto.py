"""`fluidity cloud` and the scripts against moto in server mode on 127.0.0.1 (never real AWS).

What moto cannot check, and so these tests do not claim:
- moto's CloudFormation skips resource types it does not implement: API Gateway Stage, ApiKey,
  UsagePlan and UsagePlanKey, CloudWatch Alarms, SNS Subscriptions (and the outputs that refer to
  them); it records only stack-level events (no per-resource events), and a resource that fails
  makes CreateStack itself fail instead of a CREATE_FAILED event. The event streaming and the
  "failed resource and reason" message are therefore checked with a scripted CloudFormation
  client (test_failed_stack_names_the_failed_resource_and_its_reason).
- moto's ECS resource keeps only the family, containers, volumes and memory of a task definition
  (no cpu, networkMode or compatibilities) and only the cluster, desired count and task
  definition of a service (no launch type or network configuration), and it does not start tasks
  for a service. The lifecycle tests therefore run against a service created through the ECS API
  with the template's values (tests/awsfixtures.py create_fargate_service), and EcsScheduler plays
  the ECS scheduler: it runs a task for the desired count and gives its ENI the Elastic IP
  127.0.0.1, where DescribeNetworkInterfaces reports a real task's public IP.
- Security group egress rules from the template are ignored by moto (it keeps its default).
- The template properties moto drops are asserted on the parsed YAML in test_templates.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from fluidity.cloud.aws import AwsError, AwsTarget
from fluidity.cloud.logs import tail
from fluidity.cloud.service import ServiceRef, status
from fluidity.cloud.stacks import StackDeployer
from tests.awsfixtures import EcsScheduler, FargateService, aws_client, create_fargate_service
from tests.cloud.conftest import REPO

# moto warns for each resource type it skips (listed above); that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse AWS:UserWarning")

IMAGE = "111111111111.dkr.ecr.us-east-1.amazonaws.com/fluidity-server:0.1.0"
AGENT_LINE = "Run agent: fluidity agent --config configs/agent.yaml --server-ip 127.0.0.1"


def fluidity(*args: str, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fluidity", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        **kwargs,
        check=False,
    )


@dataclass(frozen=True)
class Deployed:
    endpoint: str
    suffix: str
    cluster: str
    service: str
    log_group: str
    fargate_stack: str
    lambda_stack: str
    bucket: str
    vpc: str
    subnets: str
    output: str

    def deploy_args(self, *extra: str) -> list[str]:
        return [
            "cloud",
            "--endpoint-url",
            self.endpoint,
            "deploy",
            "--poll-interval",
            "0.1",
            "--fargate-stack",
            self.fargate_stack,
            "--lambda-stack",
            self.lambda_stack,
            *extra,
        ]


@pytest.fixture(scope="module")
def deployed(moto_endpoint: str) -> Deployed:
    """Both stacks created in moto by `fluidity cloud deploy`, with unique names."""
    suffix = uuid.uuid4().hex[:8]
    ec2 = aws_client("ec2", moto_endpoint)
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.9.{i}.0/24")["Subnet"]["SubnetId"]
        for i in (1, 2)
    ]
    cluster, service = f"fluidity-{suffix}", f"fluidity-server-{suffix}"
    plan = Deployed(
        moto_endpoint,
        suffix,
        cluster,
        service,
        f"/fluidity/server-{suffix}",
        f"fluidity-fargate-{suffix}",
        f"fluidity-lambda-{suffix}",
        f"fluidity-code-{suffix}",
        vpc,
        ",".join(subnets),
        "",
    )
    proc = fluidity(
        *plan.deploy_args(
            "--param",
            f"ClusterName={cluster}",
            "--param",
            f"ServiceName={service}",
            "--param",
            f"VpcId={vpc}",
            "--param",
            f"PublicSubnets={','.join(subnets)}",
            "--param",
            "AllowedIngressCidr=203.0.113.7/32",
            "--param",
            f"ContainerImage={IMAGE}",
            "--param",
            f"LogGroupName={plan.log_group}",
            "--lambda-param",
            f"CodeBucket={plan.bucket}",
        )
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Deployed(**{**plan.__dict__, "output": proc.stdout})


def test_deploy_creates_both_stacks_in_moto(deployed: Deployed) -> None:
    endpoint = deployed.endpoint
    assert f"Stack {deployed.fargate_stack}: CREATE_COMPLETE" in deployed.output
    assert f"Stack {deployed.lambda_stack}: CREATE_COMPLETE" in deployed.output
    assert f"s3://{deployed.bucket}/fluidity/lambda-" in deployed.output
    cfn = aws_client("cloudformation", endpoint)
    for stack in (deployed.fargate_stack, deployed.lambda_stack):
        assert cfn.describe_stacks(StackName=stack)["Stacks"][0]["StackStatus"] == "CREATE_COMPLETE"

    ecs = aws_client("ecs", endpoint)
    (service,) = ecs.describe_services(cluster=deployed.cluster, services=[deployed.service])[
        "services"
    ]
    assert service["desiredCount"] == 0  # deployed stopped: no cost until `start`
    task = ecs.describe_task_definition(taskDefinition=service["taskDefinition"])["taskDefinition"]
    assert task["memory"] == "512"
    (container,) = task["containerDefinitions"]
    assert container["image"] == IMAGE
    assert container["portMappings"] == [{"containerPort": 8443, "protocol": "tcp"}]
    env = {item["name"]: item["value"] for item in container["environment"]}
    assert env["FLUIDITY_CLUSTER_NAME"] == deployed.cluster
    assert env["FLUIDITY_SERVICE_NAME"] == deployed.service
    assert env["FLUIDITY_EMIT_METRICS"] == "true"
    assert container["logConfiguration"]["options"]["awslogs-group"] == deployed.log_group

    groups = aws_client("logs", endpoint).describe_log_groups(logGroupNamePrefix="/")["logGroups"]
    retention = {g["logGroupName"]: g.get("retentionInDays") for g in groups}
    assert retention[deployed.log_group] == 14
    for operation in ("wake", "sleep", "kill", "status"):
        assert retention[f"/aws/lambda/{deployed.cluster}-{operation}"] == 14

    ec2 = aws_client("ec2", endpoint)
    outputs = {
        o["OutputKey"]: o["OutputValue"]
        for o in cfn.describe_stacks(StackName=deployed.fargate_stack)["Stacks"][0]["Outputs"]
    }
    (group,) = ec2.describe_security_groups(GroupIds=[outputs["SecurityGroupId"]])["SecurityGroups"]
    assert [
        (p["IpProtocol"], p["FromPort"], p["ToPort"], p["IpRanges"]) for p in group["IpPermissions"]
    ] == [("tcp", 8443, 8443, [{"CidrIp": "203.0.113.7/32"}])]

    functions = {
        f["FunctionName"]: f for f in aws_client("lambda", endpoint).list_functions()["Functions"]
    }
    for operation in ("wake", "sleep", "kill", "status"):
        function = functions[f"{deployed.cluster}-{operation}"]
        assert function["Handler"] == f"fluidity.control.lambdas.{operation}_handler"
        variables = function["Environment"]["Variables"]
        assert variables["CLUSTER_NAME"] == deployed.cluster
        assert variables["SERVICE_NAME"] == deployed.service
        assert variables["IDLE_THRESHOLD"] == "15m"

    events = aws_client("events", endpoint)
    schedules = {
        r["Name"]: r["ScheduleExpression"]
        for r in events.list_rules(NamePrefix=deployed.cluster)["Rules"]
    }
    assert schedules == {
        f"{deployed.cluster}-sleep": "rate(5 minutes)",
        f"{deployed.cluster}-kill": "cron(0 23 * * ? *)",
    }

    apigateway = aws_client("apigateway", endpoint)
    (api,) = [
        a for a in apigateway.get_rest_apis()["items"] if a["name"] == f"{deployed.cluster}-control"
    ]
    routes = {
        (method, r["path"])
        for r in apigateway.get_resources(restApiId=api["id"])["items"]
        for method in r.get("resourceMethods", {})
    }
    assert routes == {("POST", "/wake"), ("POST", "/kill"), ("GET", "/status")}

    topics = aws_client("sns", endpoint).list_topics()["Topics"]
    assert any(t["TopicArn"].endswith(f":{deployed.cluster}-alarms") for t in topics)
    iam = aws_client("iam", endpoint)
    role_policies = {
        r["RoleName"].split("-")[-2]: iam.list_role_policies(RoleName=r["RoleName"])["PolicyNames"]
        for r in iam.list_roles()["Roles"]
        if r["RoleName"].startswith((deployed.fargate_stack, deployed.lambda_stack))
    }
    assert role_policies == {
        "ExecutionRole": ["pull-image-write-logs"],
        "TaskRole": ["metrics-and-certificates"],
        "WakeRole": ["wake"],
        "SleepRole": ["sleep"],
        "KillRole": ["kill"],
        "StatusRole": ["status"],
    }


def test_deploy_again_updates_the_server_stack(deployed: Deployed) -> None:
    proc = fluidity(
        *deployed.deploy_args(
            "--only",
            "fargate",
            "--param",
            f"ContainerImage={IMAGE.replace('0.1.0', '0.1.1')}",
            "--param",
            f"VpcId={deployed.vpc}",
            "--param",
            f"PublicSubnets={deployed.subnets}",
            "--param",
            "AllowedIngressCidr=203.0.113.7/32",
        )
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Updating stack {deployed.fargate_stack}" in proc.stdout
    assert f"Stack {deployed.fargate_stack}: UPDATE_COMPLETE" in proc.stdout


def test_deploy_refuses_the_example_values_of_params_json(moto_endpoint: str) -> None:
    proc = fluidity(
        "cloud",
        "--endpoint-url",
        moto_endpoint,
        "deploy",
        "--only",
        "fargate",
        "--fargate-stack",
        f"never-{uuid.uuid4().hex[:6]}",
    )
    assert proc.returncode == 2
    assert "params.json: ContainerImage is still the example value '123456789012.dkr" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_logs_prints_the_servers_events(deployed: Deployed) -> None:
    logs = aws_client("logs", deployed.endpoint)
    logs.create_log_stream(logGroupName=deployed.log_group, logStreamName="ecs/server/abc")
    now = int(time.time() * 1000)
    logs.put_log_events(
        logGroupName=deployed.log_group,
        logStreamName="ecs/server/abc",
        logEvents=[
            {"timestamp": now - 2000, "message": "server.listening"},
            {"timestamp": now - 1000, "message": "link.up peer=x"},
        ],
    )
    proc = fluidity(
        "cloud",
        "--endpoint-url",
        deployed.endpoint,
        "logs",
        "--log-group",
        deployed.log_group,
        "--since",
        "1h",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["server.listening", "link.up peer=x"]
    assert lines[0].startswith(datetime.now(tz=UTC).strftime("%Y-%m-%dT"))


class PagedLogs:
    """FilterLogEvents as CloudWatch Logs answers a scan of many streams: a page with no events
    can still carry a nextToken (moto always fills its pages, so it cannot show this)."""

    def __init__(self) -> None:
        first = {"eventId": "1", "timestamp": 1_000, "message": "first"}
        second = {"eventId": "2", "timestamp": 2_000, "message": "second"}
        self.pages: list[dict[str, Any]] = [
            {"events": [first], "nextToken": "a"},
            {"events": [], "nextToken": "b"},
            {"events": [second]},
        ]
        self.tokens: list[str | None] = []

    def filter_log_events(self, **kwargs: Any) -> dict[str, Any]:
        self.tokens.append(kwargs.get("nextToken"))
        return self.pages[len(self.tokens) - 1]


def test_logs_reads_past_an_empty_page_that_has_a_next_token() -> None:
    logs = PagedLogs()

    class Target(AwsTarget):
        def client(self, service: str) -> Any:
            assert service == "logs"
            return logs

    lines: list[str] = []
    printed = tail(Target(region="us-east-1"), "/fluidity/server", 3600, lines.append)
    assert printed == 2
    assert [line.split(" ", 1)[1] for line in lines] == ["first", "second"]
    assert logs.tokens == [None, "a", "b"]


@pytest.fixture
def fargate_service(moto_endpoint: str) -> Iterator[FargateService]:
    service = create_fargate_service(moto_endpoint)
    yield service
    ecs = aws_client("ecs", moto_endpoint)
    ecs.update_service(cluster=service.cluster, service=service.service, desiredCount=0)
    EcsScheduler(moto_endpoint, service).reconcile()


@pytest.fixture
def scheduler(moto_endpoint: str, fargate_service: FargateService) -> Iterator[EcsScheduler]:
    """The ECS scheduler, reconciling every 0.1 s in a thread while the test runs."""
    ecs_scheduler = EcsScheduler(moto_endpoint, fargate_service, public_ip="127.0.0.1")
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            ecs_scheduler.reconcile()
            done.wait(0.1)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield ecs_scheduler
    done.set()
    thread.join(10)
    ecs = aws_client("ecs", moto_endpoint)
    ecs.update_service(
        cluster=fargate_service.cluster, service=fargate_service.service, desiredCount=0
    )
    ecs_scheduler.reconcile()


def status_report(endpoint: str, service: FargateService) -> dict[str, Any]:
    proc = fluidity(
        "cloud",
        "--endpoint-url",
        endpoint,
        "status",
        "--cluster",
        service.cluster,
        "--service",
        service.service,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def wait_for_state(endpoint: str, service: FargateService, state: str) -> dict[str, Any]:
    """Poll the status report in this process (the CLI's own output is checked elsewhere)."""
    target, ref = AwsTarget(endpoint_url=endpoint), ServiceRef(service.cluster, service.service)
    deadline = time.monotonic() + 30
    while (report := status(target, ref))["state"] != state:
        assert time.monotonic() < deadline, report
        time.sleep(0.1)
    return report


def test_cli_start_status_stop_against_moto(
    moto_endpoint: str, fargate_service: FargateService, scheduler: EcsScheduler
) -> None:
    service = fargate_service
    common = ["--cluster", service.cluster, "--service", service.service]
    started = fluidity(
        "cloud",
        "--endpoint-url",
        moto_endpoint,
        "start",
        *common,
        "--poll-interval",
        "0.1",
        "--timeout",
        "60",
    )
    assert started.returncode == 0, started.stdout + started.stderr
    assert started.stdout.splitlines() == [
        "Starting Fluidity server...",
        "Waiting for server to start...",
        "Server started. Public IP: 127.0.0.1",
        AGENT_LINE,
    ]
    assert list(scheduler.public_ips.values()) == ["127.0.0.1"]

    # The server publishes LastActivityEpochSeconds every minute while it runs.
    now = time.time()
    aws_client("cloudwatch", moto_endpoint).put_metric_data(
        Namespace="Fluidity",
        MetricData=[
            {
                "MetricName": "LastActivityEpochSeconds",
                "Value": now - 90,
                "Unit": "Seconds",
                "Timestamp": datetime.fromtimestamp(now - 30, tz=UTC),
                "Dimensions": [
                    {"Name": "ClusterName", "Value": service.cluster},
                    {"Name": "ServiceName", "Value": service.service},
                ],
            }
        ],
    )
    report = status_report(moto_endpoint, service)
    assert report["state"] == "running"
    assert report["public_ip"] == "127.0.0.1"
    assert report["task_size"] == {"cpu": 256, "memory_mib": 512, "architecture": "X86_64"}
    assert 80 <= report["idle_seconds"] <= 600
    cost = report["cost_estimate"]
    assert cost["basis"].startswith("5-minute periods this month")
    assert cost["hours"] == pytest.approx(5 / 60, abs=0.005)  # one 5-minute period with data
    assert cost["usd"] == pytest.approx(cost["hours"] * cost["usd_per_hour"], abs=1e-4)
    assert cost["usd_per_hour"] == pytest.approx(0.25 * 0.04048 + 0.5 * 0.004445, abs=1e-5)
    human = fluidity("cloud", "--endpoint-url", moto_endpoint, "status", *common)
    assert "  state:          running (desired 1, running 1)" in human.stdout
    assert "an estimate" in human.stdout
    assert "--server-ip 127.0.0.1" in human.stdout

    # --wait: returns only once the scheduler has stopped the task.
    stopped = fluidity(
        "cloud",
        "--endpoint-url",
        moto_endpoint,
        "stop",
        *common,
        "--wait",
        "--poll-interval",
        "0.1",
    )
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.splitlines() == [
        "Stopping Fluidity server...",
        "Server stopped. Billing paused.",
    ]
    final = status(
        AwsTarget(endpoint_url=moto_endpoint), ServiceRef(service.cluster, service.service)
    )
    assert final["state"] == "stopped"
    assert final["public_ip"] is None
    assert scheduler.public_ips == {}


def test_bash_scripts_start_and_stop_the_server(
    moto_endpoint: str, fargate_service: FargateService, scheduler: EcsScheduler
) -> None:
    service = fargate_service
    executable = Path(sys.executable).parent / "fluidity"
    env = {
        **os.environ,
        "FLUIDITY": str(executable),
        "AWS_ENDPOINT_URL": moto_endpoint,
        "FLUIDITY_CLUSTER_NAME": service.cluster,
        "FLUIDITY_SERVICE_NAME": service.service,
    }
    started = subprocess.run(
        ["bash", str(REPO / "scripts/start-cloud-server.sh"), "--poll-interval", "0.1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    assert "Server started. Public IP: 127.0.0.1" in started.stdout.splitlines()
    assert started.stdout.splitlines()[-1] == AGENT_LINE
    assert wait_for_state(moto_endpoint, service, "running")["public_ip"] == "127.0.0.1"

    stopped = subprocess.run(
        ["bash", str(REPO / "scripts/stop-cloud-server.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.splitlines()[-1] == "Server stopped. Billing paused."
    wait_for_state(moto_endpoint, service, "stopped")


def test_start_gives_up_with_a_reason_when_no_task_starts(
    moto_endpoint: str, fargate_service: FargateService
) -> None:
    service = fargate_service  # no scheduler: the desired count is set, nothing ever runs
    proc = fluidity(
        "cloud",
        "--endpoint-url",
        moto_endpoint,
        "start",
        "--cluster",
        service.cluster,
        "--service",
        service.service,
        "--poll-interval",
        "0.2",
        "--timeout",
        "1",
    )
    assert proc.returncode == 2
    assert "the server did not start within 1s" in proc.stderr
    assert "fluidity cloud logs" in proc.stderr


def test_status_names_a_service_that_does_not_exist(moto_endpoint: str) -> None:
    proc = fluidity(
        "cloud",
        "--endpoint-url",
        moto_endpoint,
        "status",
        "--cluster",
        "nope",
        "--service",
        "nope-server",
    )
    assert proc.returncode == 2
    assert "nope-server" in proc.stderr
    assert "Traceback" not in proc.stderr


class ScriptedCloudFormation:
    """Answers like CloudFormation while a stack creation fails (moto cannot produce this)."""

    def __init__(self) -> None:
        self.polls = 0
        stamp = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)
        self.events = [  # newest first, as DescribeStackEvents returns them
            {
                "EventId": "5",
                "LogicalResourceId": "s",
                "ResourceType": "AWS::CloudFormation::Stack",
                "ResourceStatus": "ROLLBACK_COMPLETE",
                "Timestamp": stamp,
            },
            {
                "EventId": "4",
                "LogicalResourceId": "LogGroup",
                "ResourceType": "AWS::Logs::LogGroup",
                "ResourceStatus": "CREATE_FAILED",
                "Timestamp": stamp,
                "ResourceStatusReason": "Resource creation cancelled",
            },
            {
                "EventId": "3",
                "LogicalResourceId": "TaskRole",
                "ResourceType": "AWS::IAM::Role",
                "ResourceStatus": "CREATE_FAILED",
                "Timestamp": stamp,
                "ResourceStatusReason": "User is not authorized to perform: iam:CreateRole",
            },
            {
                "EventId": "2",
                "LogicalResourceId": "LogGroup",
                "ResourceType": "AWS::Logs::LogGroup",
                "ResourceStatus": "CREATE_IN_PROGRESS",
                "Timestamp": stamp,
            },
            {
                "EventId": "1",
                "LogicalResourceId": "s",
                "ResourceType": "AWS::CloudFormation::Stack",
                "ResourceStatus": "CREATE_IN_PROGRESS",
                "Timestamp": stamp,
                "ResourceStatusReason": "User Initiated",
            },
        ]

    def describe_stacks(self, StackName: str) -> dict[str, Any]:  # noqa: N803 - boto3's names
        if self.polls == 0:
            self.polls += 1
            raise _client_error("ValidationError", f"Stack with id {StackName} does not exist")
        self.polls += 1
        status = "CREATE_IN_PROGRESS" if self.polls < 4 else "ROLLBACK_COMPLETE"
        return {"Stacks": [{"StackName": StackName, "StackId": "id", "StackStatus": status}]}

    def create_stack(self, **kwargs: Any) -> dict[str, Any]:
        return {"StackId": "id"}

    def describe_stack_events(self, StackName: str) -> dict[str, Any]:  # noqa: N803
        visible = self.events[max(0, 5 - self.polls) :] if self.polls < 4 else self.events
        return {"StackEvents": visible}


def _client_error(code: str, message: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}}, "DescribeStacks")


def test_failed_stack_names_the_failed_resource_and_its_reason(tmp_path: Path) -> None:
    template = tmp_path / "t.yaml"
    template.write_text("Resources: {}\n")
    console = Console(file=open(os.devnull, "w"), soft_wrap=True)  # noqa: SIM115
    shown: list[str] = []
    console.print = lambda *a, **k: shown.append(str(a[0]))  # type: ignore[method-assign]
    deployer = StackDeployer(
        AwsTarget(region="us-east-1"),
        console,
        poll_interval=0,
        client=ScriptedCloudFormation(),
        sleep=lambda _: None,
    )
    with pytest.raises(AwsError) as caught:
        deployer.deploy("s", template, {})
    assert str(caught.value) == (
        "stack s ROLLBACK_COMPLETE: TaskRole (AWS::IAM::Role) CREATE_FAILED: "
        "User is not authorized to perform: iam:CreateRole"
    )
    streamed = [line for line in shown if "CREATE_" in line or "ROLLBACK" in line]
    assert len(streamed) == 5  # every event once, oldest first
    assert "User Initiated" in streamed[0]
    assert "TaskRole" in streamed[2] and "iam:CreateRole" in streamed[2]


def test_destroy_needs_confirmation_then_deletes_both_stacks(deployed: Deployed) -> None:
    base = [
        "cloud",
        "--endpoint-url",
        deployed.endpoint,
        "destroy",
        "--poll-interval",
        "0.1",
        "--fargate-stack",
        deployed.fargate_stack,
        "--lambda-stack",
        deployed.lambda_stack,
    ]
    refused = fluidity(*base, stdin=subprocess.DEVNULL)
    assert refused.returncode == 2
    assert "destroy needs --yes" in refused.stderr
    proc = fluidity(*base, "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Deleted: {deployed.lambda_stack}, {deployed.fargate_stack}" in proc.stdout
    cfn = aws_client("cloudformation", deployed.endpoint)
    names = {
        s["StackName"]
        for s in cfn.list_stacks(StackStatusFilter=["CREATE_COMPLETE", "UPDATE_COMPLETE"])[
            "StackSummaries"
        ]
    }
    assert not names & {deployed.fargate_stack, deployed.lambda_stack}
