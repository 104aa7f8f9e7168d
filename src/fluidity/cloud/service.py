"""Start, stop and report on the Fargate service, the way the deployment guide's scripts do.

State, public IP and activity are read through the control plane's ECS backend
(:class:`fluidity.control.backends.ecs.EcsBackend`), so ``fluidity cloud status`` and the wake /
status Lambda functions can never disagree about what "running" means. ``start`` polls (it never
sleeps a fixed time like the original scripts) until a task runs and its ENI has a public IP.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rich.console import Console

from fluidity.cloud.aws import AwsError, AwsTarget, aws_errors
from fluidity.cloud.cost import CostEstimate, estimate, hourly_price, running_periods

DEFAULT_CLUSTER = "fluidity"
DEFAULT_SERVICE = "fluidity-server"
DEFAULT_AGENT_CONFIG = "configs/agent.yaml"
STATUS_LOOKBACK = 86400.0
"""How far back ``status`` looks for the last tunnelled activity (seconds)."""
NO_IP_GRACE = 30.0
"""Seconds ``start`` keeps waiting for a public IP once a task runs (none with AssignPublicIp
DISABLED behind the load balancer)."""


@dataclass(frozen=True)
class ServiceRef:
    cluster: str = DEFAULT_CLUSTER
    service: str = DEFAULT_SERVICE
    namespace: str = "Fluidity"


@dataclass(frozen=True)
class StartResult:
    public_ip: str | None
    agent_command: str | None


def agent_command(public_ip: str, agent_config: str = DEFAULT_AGENT_CONFIG) -> str:
    """The exact command that connects an agent to the server at ``public_ip``."""
    return f"fluidity agent --config {agent_config} --server-ip {public_ip}"


def ecs_backend(target: AwsTarget, ref: ServiceRef, lookback: float = 1800.0) -> Any:
    """The control plane's ECS backend, with this target's region, profile and endpoint."""
    from fluidity.control.backends.ecs import EcsBackend

    backend = EcsBackend(
        ref.cluster,
        ref.service,
        namespace=ref.namespace,
        lookback=lookback,
        region=target.region_name,
        endpoint_url=target.endpoint_url,
    )
    if target.profile:  # EcsBackend builds clients from the environment; use the profile's
        backend.ecs = target.client("ecs")
        backend.ec2 = target.client("ec2")
        backend.cloudwatch = target.client("cloudwatch")
    return backend


def start(
    target: AwsTarget,
    ref: ServiceRef,
    console: Console,
    *,
    poll_interval: float = 3.0,
    timeout: float = 300.0,
    agent_config: str = DEFAULT_AGENT_CONFIG,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> StartResult:
    """Desired count 1, then poll until a task runs with a public IP; print IP and agent command."""
    from fluidity.control.core import State, state_of

    backend = ecs_backend(target, ref)
    console.print("Starting Fluidity server...")
    backend.set_desired(1)
    console.print("Waiting for server to start...")
    deadline = clock() + timeout
    running_since: float | None = None
    with console.status("waiting for the ECS task ...") as spinner:
        while True:
            obs = backend.observe()
            state = state_of(obs)
            if state is State.RUNNING and obs.public_ip:
                break
            if state is State.RUNNING:
                running_since = running_since or clock()
                if clock() - running_since >= NO_IP_GRACE:
                    console.print(
                        "Server started, but its task has no public IP (AssignPublicIp DISABLED?): "
                        "connect through the load balancer (stack output LoadBalancerDnsName)."
                    )
                    return StartResult(None, None)
            spinner.update(
                f"{state.value}: {obs.pending} starting, {obs.running} running"
                + (", waiting for its public IP" if state is State.RUNNING else "")
            )
            if clock() > deadline:
                reason = last_stopped_reason(target, ref)
                raise AwsError(
                    f"the server did not start within {timeout:g}s"
                    + (f" (last stopped task: {reason})" if reason else "")
                    + ": check `fluidity cloud logs` and the service's events in the ECS console"
                )
            sleep(poll_interval)
    command = agent_command(obs.public_ip, agent_config)
    console.print(f"Server started. Public IP: {obs.public_ip}", highlight=False)
    console.print(f"Run agent: {command}", highlight=False)
    return StartResult(obs.public_ip, command)


def stop(
    target: AwsTarget,
    ref: ServiceRef,
    console: Console,
    *,
    wait: bool = False,
    poll_interval: float = 3.0,
    timeout: float = 300.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Desired count 0 (billing stops when the task has drained); ``wait`` polls until stopped."""
    from fluidity.control.core import State, state_of

    backend = ecs_backend(target, ref)
    console.print("Stopping Fluidity server...")
    backend.set_desired(0)
    if wait:
        deadline = time.monotonic() + timeout
        with console.status("waiting for the task to stop ...") as spinner:
            while (state := state_of(backend.observe())) is not State.STOPPED:
                spinner.update(f"{state.value} ...")
                if time.monotonic() > deadline:
                    raise AwsError(f"the task did not stop within {timeout:g}s")
                sleep(poll_interval)
    console.print("Server stopped. Billing paused.")


def status(target: AwsTarget, ref: ServiceRef, now: float | None = None) -> dict[str, Any]:
    """State, public IP, uptime, last activity and this month's cost estimate, JSON-ready."""
    from fluidity.control.core import state_of

    now = time.time() if now is None else now
    backend = ecs_backend(target, ref, lookback=STATUS_LOOKBACK)
    obs = backend.observe()
    activity = backend.activity(now)
    uptime = now - obs.started_at if obs.started_at and obs.running else None
    cpu, memory, architecture = task_size(target, ref)
    with aws_errors("reading the server's metrics"):
        periods = running_periods(backend.cloudwatch, ref.namespace, ref.cluster, ref.service, now)
    cost: CostEstimate = estimate(
        periods=periods,
        uptime_seconds=uptime,
        now=now,
        hourly_usd=hourly_price(cpu, memory, architecture),
    )
    last = activity.last_activity
    return {
        "cluster": ref.cluster,
        "service": ref.service,
        "state": state_of(obs).value,
        "desired": obs.desired,
        "running": obs.running,
        "public_ip": obs.public_ip,
        "started_at": _iso(obs.started_at) if obs.running else None,
        "uptime_seconds": round(uptime) if uptime is not None else None,
        "last_activity": _iso(last),
        "idle_seconds": round(now - last) if last else None,
        "task_size": {"cpu": cpu, "memory_mib": memory, "architecture": architecture},
        "cost_estimate": {
            "usd": round(cost.total_usd, 4),
            "hours": round(cost.hours, 2),
            "usd_per_hour": round(cost.hourly_usd, 5),
            "basis": cost.basis,
        },
    }


def task_size(target: AwsTarget, ref: ServiceRef) -> tuple[int, int, str]:
    """CPU units, memory (MiB) and architecture of the service's task definition."""
    ecs = target.client("ecs")
    with aws_errors(f"reading ECS service {ref.service}"):
        services = ecs.describe_services(cluster=ref.cluster, services=[ref.service])["services"]
        if not services:
            raise AwsError(f"ECS service {ref.service} not found in cluster {ref.cluster}")
        definition = ecs.describe_task_definition(taskDefinition=services[0]["taskDefinition"])
    task = definition["taskDefinition"]
    platform = task.get("runtimePlatform") or {}
    return (
        int(task.get("cpu") or 256),
        int(task.get("memory") or 512),
        str(platform.get("cpuArchitecture") or "X86_64"),
    )


def last_stopped_reason(target: AwsTarget, ref: ServiceRef) -> str | None:
    """``stoppedReason`` of the service's most recently stopped task (ECS keeps them ~1 hour)."""
    ecs = target.client("ecs")
    with aws_errors("reading stopped tasks"):
        arns = ecs.list_tasks(cluster=ref.cluster, desiredStatus="STOPPED").get("taskArns", [])
        if not arns:
            return None
        tasks = ecs.describe_tasks(cluster=ref.cluster, tasks=arns[:100]).get("tasks", [])
    ours = [t for t in tasks if t.get("group") == f"service:{ref.service}"]
    if not ours:
        return None
    newest = max(ours, key=lambda t: _epoch(t.get("stoppedAt")))
    return str(newest.get("stoppedReason") or "") or None


def format_status(report: dict[str, Any]) -> list[str]:
    """The report as the lines ``fluidity cloud status`` prints."""
    cost = report["cost_estimate"]
    size = report["task_size"]
    lines = [
        f"Fluidity server (cluster {report['cluster']}, service {report['service']})",
        f"  state:          {report['state']} (desired {report['desired']}, "
        f"running {report['running']})",
        f"  public IP:      {report['public_ip'] or '-'}",
        f"  uptime:         {_duration(report['uptime_seconds'])}"
        + (f" (since {report['started_at']})" if report["started_at"] else ""),
        "  last activity:  "
        + (
            f"{_duration(report['idle_seconds'])} ago ({report['last_activity']})"
            if report["last_activity"]
            else "none in the last 24 h"
        ),
        f"  cost estimate:  ~${cost['usd']:.2f} so far this month "
        f"({cost['hours']:.1f} h at ${cost['usd_per_hour']:.4f}/h for {size['cpu']} CPU units / "
        f"{size['memory_mib']} MiB)",
        f"                  an estimate from {cost['basis']}; Fargate on-demand us-east-1 "
        "prices, task only",
    ]
    if report["public_ip"]:
        lines.append(f"  agent:          {agent_command(report['public_ip'])}")
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


def _iso(epoch: float | None) -> str | None:
    if not epoch:
        return None
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(value: Any) -> float:
    return value.timestamp() if isinstance(value, datetime) else 0.0
