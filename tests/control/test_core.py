"""The lifecycle decisions over a table of situations, with the clock injected."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from fluidity.control.core import (
    Activity,
    Controller,
    Observation,
    Policy,
    State,
    decide_release,
    decide_sleep,
    state_of,
)

NOW = 1_800_000_000.0
MIN = 60.0
POLICY = Policy(idle_threshold=15 * MIN, startup_grace=5 * MIN, release_window=2 * MIN)


def running(started_ago: float | None = 60 * MIN) -> Observation:
    started = None if started_ago is None else NOW - started_ago
    return Observation(desired=1, running=1, public_ip="203.0.113.7", started_at=started)


@pytest.mark.parametrize(
    ("obs", "state"),
    [
        (Observation(desired=0, running=0), State.STOPPED),
        (Observation(desired=0, running=1), State.STOPPING),
        (Observation(desired=0, running=0, stopping=1), State.STOPPING),
        (Observation(desired=0, running=0, pending=1), State.STOPPING),
        (Observation(desired=1, running=0), State.STARTING),
        (Observation(desired=1, running=0, pending=1), State.STARTING),
        (Observation(desired=1, running=1), State.RUNNING),
        (Observation(desired=1, running=1, stopping=1), State.RUNNING),
    ],
)
def test_state_follows_desired_count_then_what_runs(obs: Observation, state: State) -> None:
    assert state_of(obs) is state


SLEEP_CASES = [
    # (name, observation, last activity (seconds ago, None = no data), scale down?, reason part)
    ("stopped server is left alone", Observation(0, 0), None, False, "stopped"),
    ("starting server is left alone", Observation(1, 0, pending=1), None, False, "starting"),
    ("stopping server is left alone", Observation(0, 1), None, False, "stopping"),
    ("recent activity keeps it up", running(), 5 * MIN, False, "active"),
    ("idle just under threshold keeps it up", running(), 15 * MIN - 1, False, "active"),
    ("idle at threshold stops it", running(), 15 * MIN, True, "idle 900s"),
    ("idle long stops it", running(), 50 * MIN, True, "since last activity"),
    ("within startup grace never stops", running(4 * MIN), 50 * MIN, False, "grace"),
    ("old activity of a previous run does not count", running(10 * MIN), 50 * MIN, False,
     "since server start"),
    ("idle since start beyond threshold stops", running(16 * MIN), 50 * MIN, True,
     "since server start"),
    ("no metrics: start time is the evidence", running(20 * MIN), None, True, "no activity data"),
    ("no metrics, recent start: kept", running(10 * MIN), None, False, "server start"),
    ("no metrics, no start time: kept", running(None), None, False, "not enough evidence"),
    ("no start time, idle activity stops", running(None), 20 * MIN, True, "idle"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("obs", "ago", "scale_down", "reason"),
    [case[1:] for case in SLEEP_CASES],
    ids=[case[0] for case in SLEEP_CASES],
)
def test_sleep_decision(obs: Observation, ago: float | None, scale_down: bool, reason: str) -> None:
    activity = Activity(last_activity=None if ago is None else NOW - ago)
    decision = decide_sleep(obs, activity, POLICY, NOW)
    assert decision.scale_down is scale_down
    assert reason in decision.reason


def test_keepalive_only_agents_are_idle_because_only_activity_is_counted() -> None:
    # An agent connected for an hour sends PINGs; its last *activity* is an hour old.
    decision = decide_sleep(running(), Activity(last_activity=NOW - 60 * MIN), POLICY, NOW)
    assert decision.scale_down
    assert decision.idle_seconds == pytest.approx(60 * MIN)


RELEASE_CASES = [
    # (name, agents {id: seconds ago}, releasing agent, scale down?, active agents)
    ("alone: stops", {"laptop": 1.0}, "laptop", True, ()),
    ("other agent active: stays", {"laptop": 1.0, "desktop": 30.0}, "laptop", False,
     ("desktop",)),
    ("other agent idle beyond window: stops", {"laptop": 1.0, "desktop": 3 * MIN}, "laptop",
     True, ()),
    ("other agent at the window edge: stays", {"desktop": 2 * MIN}, "laptop", False,
     ("desktop",)),
    ("no per-agent data: stops", {}, "laptop", True, ()),
    ("unknown caller: every active agent counts", {"laptop": 1.0}, None, False, ("laptop",)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("agents", "caller", "scale_down", "active"),
    [case[1:] for case in RELEASE_CASES],
    ids=[case[0] for case in RELEASE_CASES],
)
def test_release_decision(
    agents: dict[str, float], caller: str | None, scale_down: bool, active: tuple[str, ...]
) -> None:
    activity = Activity(
        last_activity=NOW, agents={agent: NOW - ago for agent, ago in agents.items()}
    )
    decision = decide_release(running(), activity, caller, POLICY, NOW)
    assert decision.scale_down is scale_down
    assert decision.active_agents == active


def test_release_of_a_stopped_server_changes_nothing() -> None:
    decision = decide_release(Observation(0, 0), Activity(None), "laptop", POLICY, NOW)
    assert not decision.scale_down
    assert "stopped" in decision.reason


def test_policy_refuses_negative_durations() -> None:
    with pytest.raises(ValueError, match="idle_threshold"):
        Policy(idle_threshold=-1)


@dataclass
class MemoryBackend:
    """The smallest backend: counts in memory, activity given by the test."""

    obs: Observation
    activity_seen: Activity = field(default_factory=lambda: Activity(None))
    calls: list[int] = field(default_factory=list)

    def observe(self) -> Observation:
        return self.obs

    def set_desired(self, count: int) -> None:
        self.calls.append(count)
        self.obs = Observation(desired=count, running=self.obs.running)

    def activity(self, now: float) -> Activity:
        return self.activity_seen


def test_wake_changes_only_a_stopped_service() -> None:
    backend = MemoryBackend(Observation(0, 0))
    controller = Controller(backend, POLICY, clock=lambda: NOW)
    first = controller.wake()
    assert first == {
        "state": "starting",
        "desired": 1,
        "running": 0,
        "public_ip": None,
        "changed": True,
    }
    second = controller.wake()
    assert second["changed"] is False
    assert backend.calls == [1]


def test_status_never_changes_anything() -> None:
    backend = MemoryBackend(running())
    result = Controller(backend, POLICY, clock=lambda: NOW).status()
    assert result["state"] == "running"
    assert result["public_ip"] == "203.0.113.7"
    assert backend.calls == []


def test_kill_always_stops_and_reports_stopping() -> None:
    backend = MemoryBackend(running())
    backend.activity_seen = Activity(last_activity=NOW)  # busy: kill does not care
    result = Controller(backend, POLICY, clock=lambda: NOW).kill()
    assert result["state"] == "stopping"
    assert result["changed"] is True
    assert result["action"] == "scaled_down"
    assert backend.calls == [0]


def test_sleep_reports_its_evidence_with_the_injected_clock() -> None:
    backend = MemoryBackend(running())
    backend.activity_seen = Activity(last_activity=NOW - 20 * MIN)
    result = Controller(backend, POLICY, clock=lambda: NOW).sleep()
    assert result["action"] == "scaled_down"
    assert result["last_activity"] == NOW - 20 * MIN
    assert result["idle_seconds"] == 20 * MIN
    assert result["threshold_seconds"] == 15 * MIN
    assert result["state"] == "stopping"
    assert backend.calls == [0]


def test_release_reports_the_agents_that_keep_the_server_up() -> None:
    backend = MemoryBackend(running())
    backend.activity_seen = Activity(NOW, agents={"desktop": NOW - 10, "laptop": NOW})
    result = Controller(backend, POLICY, clock=lambda: NOW).release("laptop")
    assert result["action"] == "no_change"
    assert result["active_agents"] == ["desktop"]
    assert backend.calls == []


@pytest.mark.parametrize(
    ("now", "hhmm", "seconds"),
    [
        ("2026-11-27T22:59:00", (23, 0), 60.0),
        ("2026-11-27T23:00:00", (23, 0), 86400.0),  # strictly after: tomorrow's
        ("2026-11-27T23:30:00", (23, 0), 84600.0),
        ("2026-11-27T00:00:00", (0, 0), 86400.0),
    ],
)
def test_daily_kill_is_at_the_next_utc_time(
    now: str, hhmm: tuple[int, int], seconds: float
) -> None:
    from datetime import UTC, datetime

    from fluidity.control.schedule import seconds_until_daily

    stamp = datetime.fromisoformat(now).replace(tzinfo=UTC).timestamp()
    assert seconds_until_daily(stamp, *hhmm) == seconds


def test_daily_kill_time_is_validated() -> None:
    from fluidity.control.schedule import parse_daily_time
    from fluidity.errors import ConfigError

    assert parse_daily_time("23:00") == (23, 0)
    assert parse_daily_time(" 7:05 ") == (7, 5)
    assert parse_daily_time("") is None
    for bad in ("24:00", "23:60", "11pm", "23"):
        with pytest.raises(ConfigError, match="HH:MM"):
            parse_daily_time(bad)


async def test_schedule_runs_the_daily_kill_and_the_idle_checks() -> None:
    import asyncio
    from datetime import UTC, datetime

    from fluidity.control.schedule import Schedule

    backend = MemoryBackend(running(), activity_seen=Activity(last_activity=NOW))  # busy
    controller = Controller(backend, POLICY, clock=lambda: NOW)
    # The injected clock says it is 0.1 s before 23:00 UTC; idle checks every 0.05 s.
    just_before = datetime(2026, 11, 27, 23, 0, tzinfo=UTC).timestamp() - 0.1
    schedule = Schedule(
        controller, sleep_interval=0.05, daily_kill=(23, 0), clock=lambda: just_before
    )
    sleeps = 0
    original = controller.sleep

    def counting_sleep() -> dict[str, object]:
        nonlocal sleeps
        sleeps += 1
        return original()

    controller.sleep = counting_sleep  # type: ignore[method-assign]
    schedule.start()
    try:
        for _ in range(100):  # bounded: at most 5 s
            if backend.calls == [0] and sleeps >= 2:
                break
            await asyncio.sleep(0.05)
    finally:
        await schedule.stop()
    assert backend.calls == [0]  # the kill, once: the busy server was never idle
    assert sleeps >= 2
