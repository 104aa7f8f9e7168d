"""The ECS backend: a service's desired count, its tasks, their public IPs, CloudWatch activity.

* state: ``ecs:DescribeServices`` (desired count), ``ecs:ListTasks`` + ``ecs:DescribeTasks`` (the
  service's tasks, recognised by ``group == "service:<name>"``), ``ec2:DescribeNetworkInterfaces``
  on the task ENI for the public IP (as the spec's start script does);
* changes: ``ecs:UpdateService(desiredCount=...)``;
* activity: ``cloudwatch:GetMetricData`` on ``LastActivityEpochSeconds`` (Maximum, 60 s periods,
  over ``lookback``) with dimensions ``ClusterName`` and ``ServiceName``, exactly what the server's
  emitter publishes; per agent, ``cloudwatch:ListMetrics`` then ``GetMetricData`` on
  ``AgentLastActivityEpochSeconds`` (one more dimension: ``AgentId``), counting only agents whose
  newest datapoint is under ``AGENT_FRESHNESS`` old (still connected).

A task's start time is its ``startedAt`` (else ``createdAt``); if the API gives neither, the
primary deployment's ``updatedAt``. Imports only the standard library and boto3 (the Lambda
package imports this module).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from fluidity.control.core import Activity, BackendError, Observation

LAST_ACTIVITY = "LastActivityEpochSeconds"
AGENT_LAST_ACTIVITY = "AgentLastActivityEpochSeconds"
MAX_AGENTS = 400
"""Most per-agent series read in one decision (GetMetricData takes 500 queries per call)."""
AGENT_FRESHNESS = 150.0
"""An agent counts as connected if its series has a datapoint this recent (seconds): the server
publishes each connected agent every ``metrics_interval`` (60 s) and stops when its link closes."""
_STARTING = {"PROVISIONING", "PENDING", "ACTIVATING"}
_GONE = {"STOPPED", "DELETED", "DEPROVISIONING"}
_CLIENT_CONFIG = Config(
    connect_timeout=5, read_timeout=10, retries={"max_attempts": 3, "mode": "standard"}
)


def _reason(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".strip()
    return str(exc)


def _epoch(value: Any) -> float | None:
    return value.timestamp() if isinstance(value, datetime) else None


class EcsBackend:
    """One ECS service in one cluster. ``endpoint_url`` points every client elsewhere (moto)."""

    def __init__(
        self,
        cluster: str,
        service: str,
        *,
        namespace: str = "Fluidity",
        lookback: float = 1800.0,
        region: str | None = None,
        endpoint_url: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.service = service
        self.namespace = namespace
        self.lookback = lookback
        # boto3's default session caches the parsed service models: a warm Lambda (or a test)
        # creating a backend again does not parse them again.
        kwargs: dict[str, Any] = {"config": _CLIENT_CONFIG, "region_name": region}
        if endpoint_url:
            kwargs["endpoint_url"] = endpoint_url
        # Typed as Any: the responses are read as plain dicts, field by field, with defaults.
        self.ecs: Any = boto3.client("ecs", **kwargs)
        self.ec2: Any = boto3.client("ec2", **kwargs)
        self.cloudwatch: Any = boto3.client("cloudwatch", **kwargs)

    @property
    def dimensions(self) -> list[dict[str, str]]:
        return [
            {"Name": "ClusterName", "Value": self.cluster},
            {"Name": "ServiceName", "Value": self.service},
        ]

    # --- state -----------------------------------------------------------------------------------

    def observe(self) -> Observation:
        where = f"ECS service {self.service!r} in cluster {self.cluster!r}"
        try:
            described = self.ecs.describe_services(cluster=self.cluster, services=[self.service])
            services = described.get("services", [])
            if not services or services[0].get("status") != "ACTIVE":
                raise BackendError(
                    f"{where} not found or not ACTIVE: check CLUSTER_NAME and SERVICE_NAME"
                )
            service = services[0]
            tasks = self._tasks()
            running = [t for t in tasks if _live(t) and t.get("lastStatus") == "RUNNING"]
            pending = [t for t in tasks if _live(t) and t.get("lastStatus") in _STARTING]
            stopping = [t for t in tasks if not _live(t) and t.get("lastStatus") not in _GONE]
            newest = max(running or pending, key=_task_start, default=None)
            public_ip = self._public_ip(newest) if newest is not None else None
        except (BotoCoreError, ClientError) as exc:
            raise BackendError(f"cannot read {where}: {_reason(exc)}") from None
        started_at = None
        if running:
            started_at = _task_start(max(running, key=_task_start)) or _deployment_time(service)
        return Observation(
            desired=int(service.get("desiredCount", 0)),
            running=len(running),
            pending=len(pending),
            stopping=len(stopping),
            public_ip=public_ip,
            started_at=started_at,
        )

    def set_desired(self, count: int) -> None:
        try:
            self.ecs.update_service(cluster=self.cluster, service=self.service, desiredCount=count)
        except (BotoCoreError, ClientError) as exc:
            raise BackendError(
                f"cannot set desired count {count} on ECS service {self.service!r}: {_reason(exc)}"
            ) from None

    def _tasks(self) -> list[dict[str, Any]]:
        """The service's tasks that are live or still stopping (stopped ones are skipped)."""
        arns: list[str] = []
        paginator = self.ecs.get_paginator("list_tasks")
        for desired in ("RUNNING", "STOPPED"):
            pages = paginator.paginate(
                cluster=self.cluster, serviceName=self.service, desiredStatus=desired
            )
            for page in pages:
                arns.extend(page.get("taskArns", []))
        tasks: list[dict[str, Any]] = []
        for start in range(0, len(arns), 100):
            chunk = arns[start : start + 100]
            tasks.extend(self.ecs.describe_tasks(cluster=self.cluster, tasks=chunk)["tasks"])
        group = f"service:{self.service}"
        return [t for t in tasks if t.get("group") == group and t.get("lastStatus") != "STOPPED"]

    def _public_ip(self, task: dict[str, Any]) -> str | None:
        eni = _eni_of(task)
        if eni is None:
            return None
        try:
            found = self.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])
        except ClientError as exc:
            if "NotFound" in exc.response.get("Error", {}).get("Code", ""):
                return None  # the ENI went away with a stopping task
            raise
        for interface in found.get("NetworkInterfaces", []):
            address = interface.get("Association", {}).get("PublicIp")
            if address:
                return str(address)
        return None

    # --- activity --------------------------------------------------------------------------------

    def activity(self, now: float) -> Activity:
        try:
            agents = self._agent_series()
            queries = [self._query("last", LAST_ACTIVITY, self.dimensions)]
            for index, agent in enumerate(agents):
                dims = [*self.dimensions, {"Name": "AgentId", "Value": agent}]
                queries.append(self._query(f"a{index}", AGENT_LAST_ACTIVITY, dims))
            results = self._results(queries, now)
        except (BotoCoreError, ClientError) as exc:
            raise BackendError(f"cannot read CloudWatch metrics: {_reason(exc)}") from None
        last = results.get("last")
        per_agent: dict[str, float] = {}
        for index, agent in enumerate(agents):
            series = results.get(f"a{index}")
            if series is not None and series[1] >= now - AGENT_FRESHNESS:
                per_agent[agent] = series[0]
        return Activity(last_activity=last[0] if last else None, agents=per_agent)

    def _agent_series(self) -> list[str]:
        agents: list[str] = []
        paginator = self.cloudwatch.get_paginator("list_metrics")
        pages = paginator.paginate(
            Namespace=self.namespace, MetricName=AGENT_LAST_ACTIVITY, Dimensions=self.dimensions
        )
        for page in pages:
            for metric in page.get("Metrics", []):
                dims = {d["Name"]: d["Value"] for d in metric.get("Dimensions", [])}
                agent = dims.get("AgentId")
                if agent and len(dims) == 3 and agent not in agents:
                    agents.append(agent)
        return agents[:MAX_AGENTS]

    def _query(self, query_id: str, name: str, dims: list[dict[str, str]]) -> dict[str, Any]:
        return {
            "Id": query_id,
            "MetricStat": {
                "Metric": {"Namespace": self.namespace, "MetricName": name, "Dimensions": dims},
                "Period": 60,
                "Stat": "Maximum",
            },
            "ReturnData": True,
        }

    def _results(self, queries: list[dict[str, Any]], now: float) -> dict[str, tuple[float, float]]:
        """Query id -> (largest value, newest datapoint's Unix time) over the lookback."""
        start = datetime.fromtimestamp(now - self.lookback, tz=UTC)
        end = datetime.fromtimestamp(now + 60, tz=UTC)
        found: dict[str, tuple[float, float]] = {}
        for result in _metric_results(self.cloudwatch, queries, start, end):
            values = [float(v) for v in result.get("Values", [])]
            stamps = [_epoch(t) or 0.0 for t in result.get("Timestamps", [])]
            if not values:
                continue
            value, newest = max(values), max(stamps, default=0.0)
            old = found.get(result["Id"])  # results may come in several pages
            if old is not None:
                value, newest = max(value, old[0]), max(newest, old[1])
            found[result["Id"]] = (value, newest)
        return found


def _metric_results(
    cloudwatch: Any, queries: list[dict[str, Any]], start: datetime, end: datetime
) -> Iterable[dict[str, Any]]:
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {
            "MetricDataQueries": queries,
            "StartTime": start,
            "EndTime": end,
            "ScanBy": "TimestampDescending",
        }
        if token:
            kwargs["NextToken"] = token
        page = cloudwatch.get_metric_data(**kwargs)
        yield from page.get("MetricDataResults", [])
        token = page.get("NextToken")
        if not token:
            return


def _live(task: dict[str, Any]) -> bool:
    return task.get("desiredStatus") == "RUNNING"


def _task_start(task: dict[str, Any]) -> float:
    return _epoch(task.get("startedAt")) or _epoch(task.get("createdAt")) or 0.0


def _deployment_time(service: dict[str, Any]) -> float | None:
    for deployment in service.get("deployments", []):
        if deployment.get("status") == "PRIMARY":
            return _epoch(deployment.get("updatedAt")) or _epoch(deployment.get("createdAt"))
    return None


def _eni_of(task: dict[str, Any]) -> str | None:
    for attachment in task.get("attachments", []):
        for detail in attachment.get("details", []):
            if detail.get("name") == "networkInterfaceId":
                return str(detail.get("value"))
    return None
