"""An estimate of what the Fargate task cost so far this month, stated as an estimate.

Running time comes from the server's own CloudWatch metrics: the server publishes
``LastActivityEpochSeconds`` every ``metrics_interval`` while it runs, so the number of 5-minute
periods of this month holding a data point, times 5 minutes, is its running time (at 5-minute
resolution: each start and stop may add up to 5 minutes). Without metrics (``emit_metrics`` off)
only the current task's uptime is known, and the estimate says so. The price is Fargate
on-demand Linux in us-east-1 (:data:`PRICES`); other regions differ by a few percent, and
CloudWatch, data transfer, the load balancer and the Lambda functions are not included.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

PERIOD_SECONDS = 300
"""Resolution of the running-time count (CloudWatch keeps 5-minute data for 63 days)."""
PRICES = {
    # architecture: (USD per vCPU-hour, USD per GB-hour), Fargate Linux on-demand, us-east-1
    "X86_64": (0.04048, 0.004445),
    "ARM64": (0.03238, 0.00356),
}
"""Fargate on-demand prices used for the estimate (USD, us-east-1)."""


@dataclass(frozen=True)
class CostEstimate:
    hours: float
    hourly_usd: float
    total_usd: float
    basis: str
    """Where the hours come from, for the person reading it."""


def hourly_price(cpu_units: int, memory_mib: int, architecture: str = "X86_64") -> float:
    """USD per hour of a task with ``cpu_units`` (1024 = 1 vCPU) and ``memory_mib``."""
    per_vcpu, per_gb = PRICES.get(architecture.upper(), PRICES["X86_64"])
    return cpu_units / 1024 * per_vcpu + memory_mib / 1024 * per_gb


def month_start(now: float) -> datetime:
    moment = datetime.fromtimestamp(now, tz=UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def running_periods(cloudwatch: Any, namespace: str, cluster: str, service: str, now: float) -> int:
    """5-minute periods since the start of the month in which the server published metrics."""
    start = month_start(now)
    end = datetime.fromtimestamp(now, tz=UTC)
    query = {
        "Id": "running",
        "MetricStat": {
            "Metric": {
                "Namespace": namespace,
                "MetricName": "LastActivityEpochSeconds",
                "Dimensions": [
                    {"Name": "ClusterName", "Value": cluster},
                    {"Name": "ServiceName", "Value": service},
                ],
            },
            "Period": PERIOD_SECONDS,
            "Stat": "SampleCount",
        },
        "ReturnData": True,
    }
    periods = 0
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"MetricDataQueries": [query], "StartTime": start, "EndTime": end}
        if token:
            kwargs["NextToken"] = token
        page = cloudwatch.get_metric_data(**kwargs)
        for result in page.get("MetricDataResults", []):
            periods += sum(1 for value in result.get("Values", []) if value > 0)
        token = page.get("NextToken")
        if not token:
            return periods


def estimate(
    *, periods: int, uptime_seconds: float | None, now: float, hourly_usd: float
) -> CostEstimate:
    """Prefer the metric count; fall back to the current task's uptime within this month."""
    if periods > 0:
        hours = periods * PERIOD_SECONDS / 3600
        basis = "5-minute periods this month in which the server published metrics"
    elif uptime_seconds:
        since_month = now - month_start(now).timestamp()
        hours = min(uptime_seconds, since_month) / 3600
        basis = "the current task's uptime only (no metrics found: is emit_metrics on?)"
    else:
        hours = 0.0
        basis = "no running time found this month"
    return CostEstimate(hours, hourly_usd, hours * hourly_usd, basis)
