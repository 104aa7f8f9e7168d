"""Lifecycle decisions, written once for every backend: state, wake, sleep, release, kill.

A backend (ECS + CloudWatch, or a local ``fluidity server`` process) reports what it sees as an
:class:`Observation` (desired and running counts, public IP, start time) and the server's tunnelled
activity as an :class:`Activity`. Pure functions (:func:`state_of`, :func:`decide_sleep`,
:func:`decide_release`) turn those into decisions for a given ``now``; :class:`Controller` applies
them through the backend and returns plain dicts with the stable JSON field names documented in
``docs/lambda.md``. The clock is injected, so every decision is testable without waiting.

Activity means tunnelled traffic only (a stream opened or a byte carried); an agent that sits
connected answering keepalive PINGs is idle. This module imports only the standard library and the
project's stdlib-only ``errors`` and ``logs`` modules, because the Lambda package imports it.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from fluidity.errors import FluidityError
from fluidity.logs import log

logger = logging.getLogger("fluidity.control")


class BackendError(FluidityError):
    """The backend (AWS APIs, the local server process) could not be read or changed."""


class State(enum.StrEnum):
    """What the server is doing, as every operation reports it in ``state``."""

    STOPPED = "stopped"  # desired 0, nothing running
    STARTING = "starting"  # desired 1, not running yet
    RUNNING = "running"  # desired 1, a server runs
    STOPPING = "stopping"  # desired 0, a server has not finished stopping


@dataclass(frozen=True, slots=True)
class Observation:
    """The server as a backend sees it at one moment."""

    desired: int
    """Servers wanted: the ECS service's desired count, or 0/1 for the local process."""
    running: int
    """Servers running (ECS tasks in RUNNING; a local process that answers its admin endpoint)."""
    pending: int = 0
    """Servers starting (tasks PROVISIONING/PENDING/ACTIVATING; a process not answering yet)."""
    stopping: int = 0
    """Servers told to stop that have not finished (tasks draining; a process still exiting)."""
    public_ip: str | None = None
    """Address agents should dial, when known (the task ENI's public IP; the local host)."""
    started_at: float | None = None
    """Unix time (seconds) the newest live server started, when known."""


@dataclass(frozen=True, slots=True)
class Activity:
    """Tunnelled activity the backend found (CloudWatch metrics, the server's /status)."""

    last_activity: float | None
    """Unix time of the latest stream opened or byte carried by any agent; ``None``: no data."""
    agents: Mapping[str, float] = field(default_factory=dict)
    """Agent id (client certificate common name) -> Unix time of that agent's last activity."""


@dataclass(frozen=True, slots=True)
class Policy:
    """The tunables of the decisions, in seconds."""

    idle_threshold: float = 900.0
    """Scale to 0 after this long with no tunnelled activity (``IDLE_THRESHOLD``, 15 min)."""
    startup_grace: float = 300.0
    """Never put a server to sleep within this long of its start (``STARTUP_GRACE``, 5 min)."""
    release_window: float = 120.0
    """On an agent's release, other agents active within this long keep the server up (2 min)."""

    def __post_init__(self) -> None:
        for name in ("idle_threshold", "startup_grace", "release_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} cannot be negative")


class Backend(Protocol):
    """What the controller needs from a place servers run in. Methods may raise BackendError."""

    def observe(self) -> Observation:
        """Read desired/running counts, public IP and start time."""
        ...

    def set_desired(self, count: int) -> None:
        """Ask for ``count`` servers (0 or 1)."""
        ...

    def activity(self, now: float) -> Activity:
        """Read the server's tunnelled activity up to ``now`` (Unix seconds)."""
        ...


def state_of(obs: Observation) -> State:
    """The reported state: desired count first, then what actually runs."""
    if obs.desired <= 0:
        return State.STOPPING if obs.running + obs.pending + obs.stopping > 0 else State.STOPPED
    return State.RUNNING if obs.running > 0 else State.STARTING


@dataclass(frozen=True, slots=True)
class SleepDecision:
    scale_down: bool
    reason: str
    last_activity: float | None = None
    idle_seconds: float | None = None


def decide_sleep(obs: Observation, activity: Activity, policy: Policy, now: float) -> SleepDecision:
    """Scale to 0 when a running server has had no tunnelled activity for ``idle_threshold``.

    Idle time counts from the later of the last activity and the server's start (activity from a
    previous run must not stop a server that just started). A server within ``startup_grace`` of
    its start is never stopped. Without any activity data, the start time is the evidence.
    """
    state = state_of(obs)
    if state is not State.RUNNING:
        return SleepDecision(False, f"server is {state.value}, nothing to put to sleep")
    started = obs.started_at
    if started is not None and now - started < policy.startup_grace:
        return SleepDecision(
            False,
            f"within startup grace: started {now - started:.0f}s ago, "
            f"grace is {policy.startup_grace:.0f}s",
            activity.last_activity,
        )
    candidates = [t for t in (activity.last_activity, started) if t is not None and t > 0]
    if not candidates:
        return SleepDecision(
            False, "no activity data and no start time: not enough evidence to stop the server"
        )
    since = max(candidates)
    idle = max(0.0, now - since)
    source = "last activity" if since == activity.last_activity else "server start"
    if activity.last_activity is None:
        source = "server start (no activity data: is the server emitting metrics?)"
    if idle >= policy.idle_threshold:
        reason = f"idle {idle:.0f}s since {source} >= threshold {policy.idle_threshold:.0f}s"
        return SleepDecision(True, reason, activity.last_activity, idle)
    reason = f"active: idle {idle:.0f}s since {source} < threshold {policy.idle_threshold:.0f}s"
    return SleepDecision(False, reason, activity.last_activity, idle)


@dataclass(frozen=True, slots=True)
class ReleaseDecision:
    scale_down: bool
    reason: str
    active_agents: tuple[str, ...] = ()


def decide_release(
    obs: Observation, activity: Activity, agent_id: str | None, policy: Policy, now: float
) -> ReleaseDecision:
    """An agent is leaving: stop the server unless another agent was active in ``release_window``.

    Only activity counts (streams opened, bytes carried), not open links: an agent connected but
    idle does not keep the server up. ``agent_id`` ``None`` means every agent counts as "other".
    """
    state = state_of(obs)
    if obs.desired <= 0:
        return ReleaseDecision(False, f"server is {state.value} already")
    others = sorted(
        agent
        for agent, last in activity.agents.items()
        if agent != agent_id and now - last <= policy.release_window
    )
    if others:
        return ReleaseDecision(
            False,
            f"{len(others)} other agent(s) active within {policy.release_window:.0f}s",
            tuple(others),
        )
    return ReleaseDecision(True, f"no other agent active within {policy.release_window:.0f}s", ())


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def describe(obs: Observation, *, changed: bool) -> dict[str, Any]:
    """The fields every operation reports: state, desired, running, public_ip, changed."""
    return {
        "state": state_of(obs).value,
        "desired": obs.desired,
        "running": obs.running,
        "public_ip": obs.public_ip,
        "changed": changed,
    }


class Controller:
    """Applies the decisions through a backend; one operation at a time (thread-safe).

    Every method returns the JSON-ready result and logs one ``control.<operation>`` event with the
    evidence. Backend failures propagate as :class:`BackendError`.
    """

    def __init__(
        self, backend: Backend, policy: Policy, clock: Callable[[], float] = time.time
    ) -> None:
        self.backend = backend
        self.policy = policy
        self.clock = clock
        self._lock = threading.Lock()

    def status(self) -> dict[str, Any]:
        with self._lock:
            result = describe(self.backend.observe(), changed=False)
        log(logger, logging.DEBUG, "control.status", **result)
        return result

    def wake(self) -> dict[str, Any]:
        """Desired count 1 if it was 0; report the state (``starting`` right after a change)."""
        with self._lock:
            obs = self.backend.observe()
            changed = obs.desired < 1
            if changed:
                self.backend.set_desired(1)
                obs = replace(obs, desired=1)
            result = describe(obs, changed=changed)
        log(logger, logging.INFO, "control.wake", **result)
        return result

    def kill(self) -> dict[str, Any]:
        """Desired count 0 now, whatever the activity (schedule, operator)."""
        with self._lock:
            obs = self.backend.observe()
            changed = obs.desired > 0
            if changed:
                self.backend.set_desired(0)
                obs = _stopped(obs)
            result = describe(obs, changed=changed)
            result["action"] = "scaled_down" if changed else "no_change"
        log(logger, logging.INFO, "control.kill", **result)
        return result

    def sleep(self) -> dict[str, Any]:
        """Scale to 0 if idle for ``idle_threshold`` (see :func:`decide_sleep`)."""
        with self._lock:
            now = self.clock()
            obs = self.backend.observe()
            activity = (
                self.backend.activity(now)
                if state_of(obs) is State.RUNNING
                else Activity(last_activity=None)
            )
            decision = decide_sleep(obs, activity, self.policy, now)
            if decision.scale_down:
                self.backend.set_desired(0)
                obs = _stopped(obs)
            result = describe(obs, changed=decision.scale_down)
            result.update(
                action="scaled_down" if decision.scale_down else "no_change",
                last_activity=_round(decision.last_activity),
                idle_seconds=_round(decision.idle_seconds),
                threshold_seconds=self.policy.idle_threshold,
                reason=decision.reason,
            )
        log(logger, logging.INFO, "control.sleep", **result)
        return result

    def release(self, agent_id: str | None) -> dict[str, Any]:
        """An agent leaves: scale to 0 unless another agent is active (see decide_release)."""
        with self._lock:
            now = self.clock()
            obs = self.backend.observe()
            activity = (
                self.backend.activity(now) if obs.desired > 0 else Activity(last_activity=None)
            )
            decision = decide_release(obs, activity, agent_id, self.policy, now)
            if decision.scale_down:
                self.backend.set_desired(0)
                obs = _stopped(obs)
            result = describe(obs, changed=decision.scale_down)
            result.update(
                action="scaled_down" if decision.scale_down else "no_change",
                agent_id=agent_id,
                active_agents=list(decision.active_agents),
                window_seconds=self.policy.release_window,
                reason=decision.reason,
            )
        log(logger, logging.INFO, "control.release", **result)
        return result


def _stopped(obs: Observation) -> Observation:
    """Right after desired 0: whatever still runs is reported as ``stopping``."""
    return replace(obs, desired=0)
