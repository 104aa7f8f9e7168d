"""AWS on loopback for tests: moto in server mode, a Fargate-like ECS service, a fake ECS scheduler.

Tests never reach real AWS. Everything here talks to a moto server bound to 127.0.0.1 on an
ephemeral port, with fake credentials.

Registering the fixtures
------------------------
Import the fixtures in a ``conftest.py`` of your test folder (pytest refuses ``pytest_plugins``
outside the top-level conftest, and ``tests/conftest.py`` is shared)::

    from tests.awsfixtures import aws_env, moto_endpoint  # registers the fixtures

    __all__ = ["aws_env", "moto_endpoint"]

(or import them into the test module itself). Every folder that imports ``moto_endpoint`` gets
the same moto server: it is started once per process and stopped after its last user.

Fixtures
--------
``moto_endpoint`` (session scope) -> ``str``
    Starts ``moto.server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)`` once per session and
    yields its URL, e.g. ``"http://127.0.0.1:40123"``. For the whole session it sets (and restores
    at the end) ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` (all
    ``"testing"``), ``AWS_DEFAULT_REGION`` and ``AWS_REGION`` (``"us-east-1"``) and
    ``AWS_ENDPOINT_URL`` (the moto URL), so even a boto3 client created without ``endpoint_url``
    (a Lambda handler, a child process that inherits the environment) reaches moto, never AWS.
    Moto's state is shared by the session: create resources with unique names
    (:func:`create_fargate_service` does); :func:`reset_moto` clears everything.

``aws_env`` (function scope) -> ``str``
    The same variables set with ``monkeypatch`` for one test (use it when the code under test reads
    them after another test may have changed them); yields the moto URL.

Helpers
-------
``aws_client(service, endpoint)``
    A boto3 client for ``service`` pointed at ``endpoint`` in ``us-east-1``.

``create_fargate_service(endpoint, *, cluster=None, service=None, desired_count=0,
container_port=8443) -> FargateService``
    Creates what the spec's steps 2-4 create: a VPC (DNS hostnames on; moto needs it to start
    awsvpc tasks), a subnet, a security group open on ``container_port`` (these three once per
    moto server and port, then shared, as they are never changed), an ECS cluster, a Fargate
    task definition (``awsvpc``, 256 CPU, 512 MiB, container ``server``) and a Fargate service
    with ``assignPublicIp=ENABLED`` and the given desired count. Names default to unique ones
    (``fluidity-<8 hex>`` and ``fluidity-server-<8 hex>``). Returns the ids in a frozen dataclass.

``EcsScheduler(endpoint, service, public_ip=None)``
    Plays the part of the ECS service scheduler, which moto does not: moto records a service's
    desired count but never starts tasks for it, and gives task ENIs no public IP.
    ``reconcile()`` reads the service's desired count, ``run_task``\\ s (``launchType=FARGATE``,
    the service's network configuration, ``group="service:<name>"`` as real service tasks have,
    ``startedBy=<deployment id>``) or ``stop_task``\\ s (newest first) until the number of
    ``RUNNING`` tasks matches, then gives each new task's ENI a public IP by
    ``allocate_address`` + ``associate_address(NetworkInterfaceId=...)``, exactly where
    ``ec2:DescribeNetworkInterfaces`` reports it for a real Fargate task
    (``NetworkInterfaces[0].Association.PublicIp``). Stopped tasks' addresses are disassociated
    and released. It returns the running task ARNs; ``public_ips`` maps task ARN -> address.

    ``public_ip``: the address to allocate (``allocate_address(Address=...)``). Moto accepts
    ``"127.0.0.1"``, so an agent can really dial the "Fargate" server's public IP on loopback.
    ``None`` lets moto pick one (moto's random EIPs look like ``127.x.y.z``: they exist only in
    moto, do not dial them).

    ``moto_endpoint`` makes moto's tasks stay ``RUNNING`` until stopped (by default moto moves a
    task one state towards ``STOPPED`` each time it is described).

    Limits of moto this cannot hide: tasks go straight to ``RUNNING`` (no ``PENDING``), carry no
    ``startedAt``/``createdAt`` timestamps, and ``ListTasks(serviceName=...)`` ignores the
    service filter (filter on the task's ``group`` instead); ``DescribeServices`` reports
    ``runningCount`` equal to ``desiredCount`` as soon as it is set, whatever tasks run.

``reset_moto(endpoint)``
    Clears every moto backend (``POST /moto-api/reset``). Session-wide: only for tests that own
    the whole moto state.
"""

from __future__ import annotations

import json
import logging
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

REGION = "us-east-1"
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
}
_UNSET = ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


def _environment(endpoint: str) -> dict[str, str]:
    return {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}


class _SharedServer:
    """One moto server per process, however many conftest files import ``moto_endpoint``."""

    server: Any = None
    endpoint = ""
    users = 0


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """Moto in server mode on 127.0.0.1 (ephemeral port) with fake credentials; yields its URL."""
    shared = _SharedServer
    if shared.server is None:
        from moto.server import ThreadedMotoServer

        # Werkzeug logs every request at INFO; keep test output about the tests.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        shared.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        shared.server.start()
        host, port = shared.server.get_host_and_port()
        shared.endpoint = f"http://{host}:{port}"
        _keep_tasks_running(shared.endpoint)
    shared.users += 1
    patch = pytest.MonkeyPatch()
    for name, value in _environment(shared.endpoint).items():
        patch.setenv(name, value)
    for name in _UNSET:
        patch.delenv(name, raising=False)
    try:
        yield shared.endpoint
    finally:
        patch.undo()
        shared.users -= 1
        if shared.users == 0:
            shared.server.stop()
            shared.server = None


@pytest.fixture
def aws_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Fake credentials, region and the moto endpoint in the environment of this one test."""
    for name, value in _environment(moto_endpoint).items():
        monkeypatch.setenv(name, value)
    for name in _UNSET:
        monkeypatch.delenv(name, raising=False)
    return moto_endpoint


def aws_client(service: str, endpoint: str) -> Any:
    """A boto3 client for ``service`` talking to moto at ``endpoint``."""
    import boto3

    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def _keep_tasks_running(endpoint: str) -> None:
    """Moto advances a task one state towards STOPPED each time it is described; real tasks stay
    RUNNING until stopped. Make moto's "ecs::task" transition manual with a very high count."""
    body = json.dumps(
        {"model_name": "ecs::task", "transition": {"progression": "manual", "times": 10**9}}
    ).encode()
    request = urllib.request.Request(
        f"{endpoint}/moto-api/state-manager/set-transition", method="POST", data=body
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def reset_moto(endpoint: str) -> None:
    """Clear every moto backend (session-wide) and keep tasks RUNNING as before."""
    for key in [k for k in _NETWORKS if k[0] == endpoint]:
        del _NETWORKS[key]
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
    _keep_tasks_running(endpoint)


_NETWORKS: dict[tuple[str, int], tuple[str, str, str]] = {}


def _network(endpoint: str, port: int) -> tuple[str, str, str]:
    """VPC, subnet and security group, made once per moto server and port (they never change)."""
    key = (endpoint, port)
    if key in _NETWORKS:
        return _NETWORKS[key]
    ec2 = aws_client("ec2", endpoint)
    vpc_id = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    ec2.modify_vpc_attribute(VpcId=vpc_id, EnableDnsHostnames={"Value": True})
    subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    group_id = ec2.create_security_group(
        GroupName=f"fluidity-sg-{uuid.uuid4().hex[:8]}",
        Description="Fluidity server SG",
        VpcId=vpc_id,
    )["GroupId"]
    ec2.authorize_security_group_ingress(
        GroupId=group_id,
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": port,
                "ToPort": port,
                "IpRanges": [{"CidrIp": "203.0.113.7/32"}],
            }
        ],
    )
    _NETWORKS[key] = (vpc_id, subnet_id, group_id)
    return _NETWORKS[key]


@dataclass(frozen=True)
class FargateService:
    """Ids of the resources :func:`create_fargate_service` made."""

    endpoint: str
    cluster: str
    service: str
    task_definition_arn: str
    vpc_id: str
    subnet_id: str
    security_group_id: str
    container_port: int
    region: str = REGION


def create_fargate_service(
    endpoint: str,
    *,
    cluster: str | None = None,
    service: str | None = None,
    desired_count: int = 0,
    container_port: int = 8443,
) -> FargateService:
    """VPC, subnet, security group, cluster, task definition and Fargate service in moto."""
    suffix = uuid.uuid4().hex[:8]
    cluster = cluster or f"fluidity-{suffix}"
    service = service or f"fluidity-server-{suffix}"
    ecs = aws_client("ecs", endpoint)
    vpc_id, subnet_id, group_id = _network(endpoint, container_port)
    ecs.create_cluster(clusterName=cluster)
    family = f"fluidity-server-{suffix}"
    task_definition_arn = ecs.register_task_definition(
        family=family,
        networkMode="awsvpc",
        requiresCompatibilities=["FARGATE"],
        cpu="256",
        memory="512",
        containerDefinitions=[
            {
                "name": "server",
                "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/fluidity-server:latest",
                "cpu": 256,
                "memory": 512,
                "essential": True,
                "portMappings": [
                    {"containerPort": container_port, "hostPort": container_port, "protocol": "tcp"}
                ],
                "environment": [
                    {"name": "FLUIDITY_CLUSTER_NAME", "value": cluster},
                    {"name": "FLUIDITY_SERVICE_NAME", "value": service},
                ],
            }
        ],
    )["taskDefinition"]["taskDefinitionArn"]
    ecs.create_service(
        cluster=cluster,
        serviceName=service,
        taskDefinition=task_definition_arn,
        desiredCount=desired_count,
        launchType="FARGATE",
        networkConfiguration={
            "awsvpcConfiguration": {
                "subnets": [subnet_id],
                "securityGroups": [group_id],
                "assignPublicIp": "ENABLED",
            }
        },
    )
    return FargateService(
        endpoint=endpoint,
        cluster=cluster,
        service=service,
        task_definition_arn=task_definition_arn,
        vpc_id=vpc_id,
        subnet_id=subnet_id,
        security_group_id=group_id,
        container_port=container_port,
    )


@dataclass
class EcsScheduler:
    """Starts and stops tasks so that a moto ECS service's running tasks match its desired count."""

    endpoint: str
    service: FargateService
    public_ip: str | None = None
    public_ips: dict[str, str] = field(default_factory=dict)  # task ARN -> public IP
    _allocations: dict[str, tuple[str, str]] = field(default_factory=dict)  # ARN -> (alloc, assoc)

    def __post_init__(self) -> None:
        self._ecs = aws_client("ecs", self.endpoint)
        self._ec2 = aws_client("ec2", self.endpoint)

    def running_tasks(self) -> list[str]:
        """ARNs of this service's tasks whose desired status is RUNNING (oldest first)."""
        svc = self.service
        arns = self._ecs.list_tasks(cluster=svc.cluster, desiredStatus="RUNNING")["taskArns"]
        if not arns:
            return []
        tasks = self._ecs.describe_tasks(cluster=svc.cluster, tasks=arns)["tasks"]
        ours = {t["taskArn"] for t in tasks if t.get("group") == f"service:{svc.service}"}
        return [arn for arn in arns if arn in ours]

    def reconcile(self) -> list[str]:
        """Run or stop tasks to match the desired count; return the running task ARNs."""
        svc = self.service
        described = self._ecs.describe_services(cluster=svc.cluster, services=[svc.service])
        service = described["services"][0]
        desired = int(service["desiredCount"])
        running = self.running_tasks()
        if len(running) < desired:
            deployment = (service.get("deployments") or [{}])[0].get("id", "ecs-svc/scheduler")
            started = self._ecs.run_task(
                cluster=svc.cluster,
                taskDefinition=service["taskDefinition"],
                count=desired - len(running),
                launchType="FARGATE",
                group=f"service:{svc.service}",
                startedBy=deployment,
                networkConfiguration=service["networkConfiguration"],
            )["tasks"]
            for task in started:
                self._give_public_ip(task)
                running.append(task["taskArn"])
        while len(running) > desired:
            arn = running.pop()
            self._ecs.stop_task(cluster=svc.cluster, task=arn, reason="Scaling activity")
            self._release_public_ip(arn)
        return running

    def _give_public_ip(self, task: dict[str, Any]) -> None:
        eni = _eni_of(task)
        if self.public_ip is None:
            allocation = self._ec2.allocate_address(Domain="vpc")
        else:
            allocation = self._ec2.allocate_address(Domain="vpc", Address=self.public_ip)
        association = self._ec2.associate_address(
            AllocationId=allocation["AllocationId"], NetworkInterfaceId=eni
        )
        self._allocations[task["taskArn"]] = (
            allocation["AllocationId"],
            association["AssociationId"],
        )
        self.public_ips[task["taskArn"]] = allocation["PublicIp"]

    def _release_public_ip(self, arn: str) -> None:
        allocation = self._allocations.pop(arn, None)
        self.public_ips.pop(arn, None)
        if allocation is None:
            return
        allocation_id, association_id = allocation
        self._ec2.disassociate_address(AssociationId=association_id)
        self._ec2.release_address(AllocationId=allocation_id)


def _eni_of(task: dict[str, Any]) -> str:
    for attachment in task.get("attachments", []):
        for detail in attachment.get("details", []):
            if detail.get("name") == "networkInterfaceId":
                return str(detail["value"])
    raise AssertionError(f"task has no ENI attachment: {json.dumps(task, default=str)[:300]}")
