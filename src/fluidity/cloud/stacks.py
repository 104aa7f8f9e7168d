"""CloudFormation stacks: create or update from a template and a parameters file, stream the
stack's events until it settles, fail with the failed resource's reason; delete.

A parameters file is the JSON list the AWS CLI takes (``[{"ParameterKey": ..., "ParameterValue":
...}]``, as ``deployments/cloudformation/params.json``). On an update, parameters the file leaves
out keep their previous value. Templates are sent inline (``TemplateBody``, at most 51,200 bytes).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from fluidity.cloud.aws import AwsError, AwsTarget, aws_errors
from fluidity.errors import ConfigError

MAX_TEMPLATE_BODY = 51_200
"""CloudFormation's limit on an inline template (bytes)."""
CAPABILITIES = ["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"]
_PLACEHOLDER = re.compile(r"x{3,}|x\.x\.x\.x|123456789012")
_DONE_OK = {"CREATE_COMPLETE", "UPDATE_COMPLETE", "DELETE_COMPLETE", "IMPORT_COMPLETE"}
_DONE_BAD = {
    "CREATE_FAILED",
    "ROLLBACK_COMPLETE",
    "ROLLBACK_FAILED",
    "DELETE_FAILED",
    "UPDATE_ROLLBACK_COMPLETE",
    "UPDATE_ROLLBACK_FAILED",
    "UPDATE_FAILED",
    "IMPORT_ROLLBACK_COMPLETE",
    "IMPORT_ROLLBACK_FAILED",
}
_CANCELLED = "Resource creation cancelled"


@dataclass(frozen=True)
class StackResult:
    """How a deploy ended: the final status and the stack's outputs (``OutputKey -> value``)."""

    name: str
    status: str
    outputs: dict[str, str]
    changed: bool


def load_parameters(path: Path) -> dict[str, str]:
    """``ParameterKey -> ParameterValue`` from an AWS CLI parameters file; errors name the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read parameters file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise ConfigError(f'{path}: expected a JSON list of {{"ParameterKey", "ParameterValue"}}')
    parameters: dict[str, str] = {}
    for index, item in enumerate(data):
        if not isinstance(item, dict) or "ParameterKey" not in item or "ParameterValue" not in item:
            raise ConfigError(f"{path}: item {index} needs ParameterKey and ParameterValue")
        parameters[str(item["ParameterKey"])] = str(item["ParameterValue"])
    return parameters


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``["Key=Value", ...]`` from repeated ``--param`` flags."""
    overrides: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: expected Key=Value, e.g. --param DesiredCount=0")
        overrides[key] = value
    return overrides


def check_placeholders(parameters: Mapping[str, str], source: str) -> None:
    """Refuse the example values of ``params.json`` (``vpc-xxxxx``, ``x.x.x.x/32``, ...)."""
    for key, value in parameters.items():
        if _PLACEHOLDER.search(value):
            raise ConfigError(
                f"{source}: {key} is still the example value {value!r}: edit the file or pass "
                f"--param {key}=... (see docs/fargate.md, CloudFormation path)"
            )


def read_template(path: Path) -> str:
    try:
        body = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read template {path}: {exc.strerror} (run from the repository root or "
            "pass --template-dir)"
        ) from None
    if len(body.encode()) > MAX_TEMPLATE_BODY:
        raise ConfigError(f"{path} is over CloudFormation's {MAX_TEMPLATE_BODY}-byte inline limit")
    return body


class StackDeployer:
    """Creates, updates and deletes one region's stacks, reporting events to ``console``."""

    def __init__(
        self,
        target: AwsTarget,
        console: Console,
        *,
        poll_interval: float = 5.0,
        timeout: float = 1800.0,
        sleep: Callable[[float], None] = time.sleep,
        client: Any | None = None,
    ) -> None:
        self.cfn = client if client is not None else target.client("cloudformation")
        self.console = console
        self.poll_interval = poll_interval
        self.timeout = timeout
        self._sleep = sleep

    def describe(self, name: str) -> dict[str, Any] | None:
        """The stack, or ``None`` if it does not exist (or was deleted)."""
        from botocore.exceptions import ClientError

        with aws_errors(f"describing stack {name}"):
            try:
                stacks = self.cfn.describe_stacks(StackName=name)["Stacks"]
            except ClientError as exc:
                if "does not exist" in exc.response.get("Error", {}).get("Message", ""):
                    return None
                raise
        if not stacks or stacks[0]["StackStatus"] == "DELETE_COMPLETE":
            return None
        return dict(stacks[0])

    def outputs(self, name: str) -> dict[str, str]:
        """The stack's outputs (empty if the stack does not exist)."""
        stack = self.describe(name)
        return _outputs(stack) if stack else {}

    def deploy(self, name: str, template: Path, parameters: Mapping[str, str]) -> StackResult:
        """Create the stack, or update it; wait for a final status, streaming events."""
        body = read_template(template)
        stack = self.describe(name)
        if stack and stack["StackStatus"] == "ROLLBACK_COMPLETE":
            raise AwsError(
                f"stack {name} is in ROLLBACK_COMPLETE (its creation failed) and cannot be "
                "updated: delete it with `fluidity cloud destroy`, fix the cause, deploy again"
            )
        given = [{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()]
        seen = self._event_ids(name) if stack else set()
        if stack is None:
            self.console.print(f"Creating stack [bold]{name}[/] from {template} ...")
            with aws_errors(f"creating stack {name}"):
                self.cfn.create_stack(
                    StackName=name,
                    TemplateBody=body,
                    Parameters=given,
                    Capabilities=CAPABILITIES,
                    OnFailure="ROLLBACK",
                )
        else:
            # Parameters the file leaves out keep their previous value. It is passed explicitly
            # rather than as UsePreviousValue, which moto cannot update with for parameters that
            # took their default; both mean the same to CloudFormation (no NoEcho parameters).
            kept = [
                {"ParameterKey": p["ParameterKey"], "ParameterValue": p["ParameterValue"]}
                for p in stack.get("Parameters", [])
                if p["ParameterKey"] not in parameters and "ParameterValue" in p
            ]
            self.console.print(f"Updating stack [bold]{name}[/] from {template} ...")
            if not self._update(name, body, given + kept):
                self.console.print(f"Stack [bold]{name}[/]: no changes.")
                return StackResult(name, stack["StackStatus"], _outputs(stack), False)
        final = self._wait(name, seen)
        return StackResult(name, final["StackStatus"], _outputs(final), True)

    def _update(self, name: str, body: str, parameters: list[dict[str, str]]) -> bool:
        """Start an update; ``False`` if CloudFormation finds nothing to change."""
        from botocore.exceptions import ClientError

        with aws_errors(f"updating stack {name}"):
            try:
                self.cfn.update_stack(
                    StackName=name,
                    TemplateBody=body,
                    Parameters=parameters,
                    Capabilities=CAPABILITIES,
                )
            except ClientError as exc:
                message = exc.response.get("Error", {}).get("Message", "")
                if "No updates are to be performed" in message:
                    return False
                raise
        return True

    def delete(self, name: str) -> bool:
        """Delete the stack and wait; ``False`` if it did not exist."""
        stack = self.describe(name)
        if stack is None:
            self.console.print(f"Stack [bold]{name}[/] does not exist.")
            return False
        seen = self._event_ids(name)
        self.console.print(f"Deleting stack [bold]{name}[/] ...")
        with aws_errors(f"deleting stack {name}"):
            self.cfn.delete_stack(StackName=stack["StackId"])
        self._wait(stack["StackId"], seen)
        return True

    def _wait(self, name: str, seen: set[str]) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        with self.console.status(f"waiting for stack {name} ...") as spinner:
            while True:
                with aws_errors(f"describing stack {name}"):
                    stack = self.cfn.describe_stacks(StackName=name)["Stacks"][0]
                events = self._new_events(name, seen)
                for event in events:
                    self.console.print(_render_event(event), highlight=False)
                status = stack["StackStatus"]
                spinner.update(f"stack {stack['StackName']}: {status}")
                if status in _DONE_OK:
                    self.console.print(f"Stack [bold]{stack['StackName']}[/]: {status}")
                    return dict(stack)
                if status in _DONE_BAD:
                    raise AwsError(self._failure(stack, name))
                if time.monotonic() > deadline:
                    raise AwsError(
                        f"stack {stack['StackName']} still {status} after {self.timeout:g}s: "
                        "see the CloudFormation console; `fluidity cloud deploy` can be rerun"
                    )
                self._sleep(self.poll_interval)

    def _event_ids(self, name: str) -> set[str]:
        with aws_errors(f"reading events of stack {name}"):
            events = self.cfn.describe_stack_events(StackName=name).get("StackEvents", [])
        return {event["EventId"] for event in events}

    def _new_events(self, name: str, seen: set[str]) -> list[dict[str, Any]]:
        """Events not shown yet, oldest first (only the newest page is read)."""
        with aws_errors(f"reading events of stack {name}"):
            events = self.cfn.describe_stack_events(StackName=name).get("StackEvents", [])
        fresh = [event for event in events if event["EventId"] not in seen]
        seen.update(event["EventId"] for event in fresh)
        return list(reversed(fresh))

    def _failure(self, stack: dict[str, Any], name: str) -> str:
        """The first failed resource and its reason, else the stack's own status reason."""
        with aws_errors(f"reading events of stack {name}"):
            events = self.cfn.describe_stack_events(StackName=name).get("StackEvents", [])
        failed = [
            event
            for event in reversed(events)
            if str(event.get("ResourceStatus", "")).endswith("_FAILED")
            and event.get("LogicalResourceId") != stack["StackName"]
            and _CANCELLED not in str(event.get("ResourceStatusReason", ""))
        ]
        status = stack["StackStatus"]
        if failed:
            first = failed[0]
            return (
                f"stack {stack['StackName']} {status}: {first['LogicalResourceId']} "
                f"({first.get('ResourceType', '?')}) {first['ResourceStatus']}: "
                f"{first.get('ResourceStatusReason', 'no reason given')}"
            )
        reason = stack.get("StackStatusReason") or "no reason given"
        return f"stack {stack['StackName']} {status}: {reason}"


def _outputs(stack: Mapping[str, Any]) -> dict[str, str]:
    return {str(o["OutputKey"]): str(o["OutputValue"]) for o in stack.get("Outputs", []) or []}


def _render_event(event: Mapping[str, Any]) -> str:
    stamp = event.get("Timestamp")
    when = stamp.strftime("%H:%M:%S") if isinstance(stamp, datetime) else ""
    reason = event.get("ResourceStatusReason") or ""
    line = (
        f"  {when}  {event.get('LogicalResourceId', '?'):<28} "
        f"{event.get('ResourceType', ''):<40} {event.get('ResourceStatus', '')}"
    )
    return f"{line}  {reason}" if reason else line
