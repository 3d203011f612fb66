"""Health verdicts (core/health.py): probes, hysteresis, machines, regions, and doubt of our own view."""

from __future__ import annotations

import random

import pytest

from daemon.core.health import (
    Doubt,
    Hysteresis,
    MachineHealth,
    MachineSignals,
    MachineVerdict,
    ProbeConditions,
    ProbeOutcome,
    RegionState,
    Verdict,
    doubt_own_connectivity,
    judge,
    machine_verdict,
    region_health,
    step,
    with_doubt,
)

RULES = Hysteresis(unhealthy_after=2, healthy_after=2, stale_after=30.0)


def ok(at: float = 0.0) -> ProbeOutcome:
    return ProbeOutcome(at=at, latency=0.05, status=200, body='{"status": "ok", "deps": {"db": "up"}}')


@pytest.mark.parametrize(
    ("outcome", "conditions", "passed", "reason"),
    [
        (ok(), ProbeConditions(), True, "status 200 in 50 ms"),
        (ProbeOutcome(0, 0.01, 503), ProbeConditions(), False, "status 503, expected 200"),
        (
            ProbeOutcome(0, 0.01, 204),
            ProbeConditions(expect_status=frozenset({200, 204})),
            True,
            "status 204",
        ),
        (ProbeOutcome(0, 2.0, 200), ProbeConditions(max_latency=1.0), False, "latency 2000 ms over 1000 ms"),
        (ok(), ProbeConditions(body_contains="ok"), True, "status 200"),
        (ok(), ProbeConditions(body_contains="ready"), False, "does not contain 'ready'"),
        (ok(), ProbeConditions(json_field=("deps.db", "up")), True, "status 200"),
        (ok(), ProbeConditions(json_field=("deps.db", "down")), False, "deps.db is 'up', expected 'down'"),
        (ok(), ProbeConditions(json_field=("deps.cache", "up")), False, "deps.cache missing"),
        (ProbeOutcome(0, 0.0, 200, "not json"), ProbeConditions(json_field=("a", 1)), False, "a missing"),
        (ProbeOutcome(0, 2.0, None, error="timeout"), ProbeConditions(), False, "no answer: timeout"),
    ],
)
def test_judge(outcome: ProbeOutcome, conditions: ProbeConditions, passed: bool, reason: str) -> None:
    """A probe passes only when answered and every condition holds; the reason says which did not."""
    result = judge(outcome, conditions)
    assert result.ok is passed
    assert reason in result.reason


def test_probe_labels() -> None:
    """Results are labelled ok, failed (a wrong answer) or error (no answer) for the metrics."""
    assert judge(ok(), ProbeConditions()).label == "ok"
    assert judge(ProbeOutcome(0, 0, 500), ProbeConditions()).label == "failed"
    assert judge(ProbeOutcome(0, 0, None, error="refused"), ProbeConditions()).label == "error"


def run(sequence: str, start: MachineHealth | None = None) -> list[Verdict]:
    """Feed probes ('+' pass, '-' fail) and return the verdict after each."""
    state = start or MachineHealth()
    verdicts = []
    for index, symbol in enumerate(sequence):
        outcome = ok(index) if symbol == "+" else ProbeOutcome(index, 0.01, 500)
        state = step(state, judge(outcome, ProbeConditions()), RULES)
        verdicts.append(state.verdict)
    return verdicts


H, U, X = Verdict.HEALTHY, Verdict.UNHEALTHY, Verdict.UNKNOWN


@pytest.mark.parametrize(
    ("sequence", "expected"),
    [
        ("++", [X, H]),
        ("--", [X, U]),
        ("++-+-+-+", [X, H, H, H, H, H, H, H]),  # flapping single failures never turn it unhealthy
        ("++--+-++", [X, H, H, U, U, U, U, H]),  # and a single success never turns it healthy
        ("---++", [X, U, U, U, H]),
    ],
)
def test_hysteresis(sequence: str, expected: list[Verdict]) -> None:
    """unhealthy_after failures in a row turn a machine unhealthy, healthy_after successes turn it back."""
    assert run(sequence) == expected


def signals(
    verdict_seq: str = "++", *, host_ok: bool = True, fly: bool | None = None, last_at: float = 10
) -> MachineSignals:
    state = MachineHealth()
    for symbol in verdict_seq:
        outcome = ok(last_at) if symbol == "+" else ProbeOutcome(last_at, 0.01, None, error="timeout")
        state = step(state, judge(outcome, ProbeConditions()), RULES)
    return MachineSignals("m1", "iad", state, host_ok=host_ok, fly_checks=fly)


@pytest.mark.parametrize(
    ("sig", "now", "verdict", "reason"),
    [
        (signals("++"), 20.0, H, "status 200"),
        (signals("--"), 20.0, U, "2 failed probe(s) in a row: no answer"),
        (signals("++", host_ok=False), 20.0, U, "host unreachable"),
        (signals("++", fly=False), 20.0, U, "Fly check is critical"),
        (signals("++"), 100.0, X, "last probe 90s ago"),  # stale
        (signals(""), 20.0, X, "no probe yet"),
        (signals("", fly=True), 20.0, H, "Fly checks passing"),
    ],
)
def test_machine_verdict(sig: MachineSignals, now: float, verdict: Verdict, reason: str) -> None:
    """Host status and Fly checks combine with the probes; a stale probe history is unknown."""
    result = machine_verdict(sig, now, RULES)
    assert result.verdict is verdict
    assert reason in result.reason


def mv(
    verdict: Verdict, *, no_answer: bool = False, unreachable: bool = False, mid: str = "m"
) -> MachineVerdict:
    return MachineVerdict(mid, "iad", verdict, "because", no_answer, unreachable)


@pytest.mark.parametrize(
    ("machines", "state"),
    [
        ([mv(H), mv(H)], RegionState.HEALTHY),
        ([mv(H), mv(U)], RegionState.DEGRADED),
        ([mv(U), mv(U)], RegionState.DOWN),
        ([mv(U, unreachable=True), mv(U, unreachable=True)], RegionState.DOWN),
        ([mv(X), mv(X)], RegionState.UNKNOWN),
        ([mv(X), mv(U)], RegionState.UNKNOWN),  # not all judged yet: too little to call it down
        ([mv(H), mv(X)], RegionState.HEALTHY),
        ([], RegionState.UNKNOWN),
    ],
)
def test_region_health(machines: list[MachineVerdict], state: RegionState) -> None:
    """Down with no healthy machine, degraded with some failing, unknown with nothing to judge."""
    assert region_health("iad", machines).state is state


def test_region_unreachable_says_so() -> None:
    """A region whose hosts are all unreachable is down, and the reason says unreachable."""
    health = region_health("cdg", [mv(U, unreachable=True, no_answer=True)])
    assert health.state is RegionState.DOWN
    assert "unreachable" in health.reason


def test_every_region_silent_means_doubt_not_down() -> None:
    """When every region of every app fails with no answer, all become unknown, saying why."""
    silent = {
        "shop": {r: region_health(r, [mv(U, no_answer=True)]) for r in ("iad", "cdg")},
        "api": {"nrt": region_health("nrt", [mv(U, no_answer=True)])},
    }
    judged = with_doubt(silent)
    assert {h.state for per_app in judged.values() for h in per_app.values()} == {RegionState.UNKNOWN}
    assert "connectivity is in doubt" in judged["shop"]["iad"].reason


def test_one_region_down_is_believed() -> None:
    """One silent region among answering ones is a real outage: it stays down."""
    regions = {
        "shop": {
            "iad": region_health("iad", [mv(H)]),
            "cdg": region_health("cdg", [mv(U, no_answer=True)]),
        }
    }
    assert with_doubt(regions)["shop"]["cdg"].state is RegionState.DOWN


def test_wrong_answers_everywhere_are_believed() -> None:
    """Every region answering 500 is a real (bad release) failure, not a connectivity doubt."""
    regions = {"shop": {r: region_health(r, [mv(U, no_answer=False)]) for r in ("iad", "cdg")}}
    assert {h.state for h in with_doubt(regions)["shop"].values()} == {RegionState.DOWN}


def test_a_stale_history_starts_afresh() -> None:
    """After a gap longer than stale_after, old failures do not count toward the next verdict."""
    state = MachineHealth()
    for at in (0.0, 1.0):
        state = step(state, judge(ProbeOutcome(at, 0.01, 500), ProbeConditions()), RULES)
    assert state.verdict is U
    state = step(state, judge(ProbeOutcome(100.0, 0.01, 500), ProbeConditions()), RULES)
    assert state.verdict is X  # one failure after the gap: not yet unhealthy again
    assert state.failures == 1


def test_a_slow_machine_is_not_a_silent_one() -> None:
    """Failures that timed out after connecting mark a machine unhealthy but answering (not an outage)."""
    state = MachineHealth()
    for at in (0.0, 1.0):
        slow = ProbeOutcome(at, 2.0, None, error="timeout after 2s", slow=True)
        state = step(state, judge(slow, ProbeConditions()), RULES)
    verdict = machine_verdict(MachineSignals("m1", "iad", state), 2.0, RULES)
    assert verdict.verdict is U
    assert verdict.no_answer is False
    silent = MachineHealth()
    for at in (0.0, 1.0):
        silent = step(
            silent, judge(ProbeOutcome(at, 2.0, None, error="cannot connect"), ProbeConditions()), RULES
        )
    assert machine_verdict(MachineSignals("m1", "iad", silent), 2.0, RULES).no_answer is True


def test_the_doubt_kept_one_app_at_a_time_is_the_doubt_of_all_apps_at_once() -> None:
    """Doubt, updated with each app as it is observed (and forgetting apps no longer watched), says at
    every step what judging every app's latest regions at once says, and tells when it changed."""
    rng = random.Random(8)
    kinds = {
        "silent": lambda r: region_health(r, [mv(U, no_answer=True)]),
        "answering 500": lambda r: region_health(r, [mv(U)]),
        "healthy": lambda r: region_health(r, [mv(H)]),
        "nothing to judge": lambda r: region_health(r, []),
    }
    doubt, latest = Doubt(), {}
    seen = {True: 0, False: 0}
    for _ in range(2000):
        app = f"app-{rng.randrange(6)}"
        before = doubt.active
        if rng.random() < 0.1:
            doubt.forget(app)
            latest.pop(app, None)
            changed = doubt.active != before
        else:
            # mostly silent, so that the doubt comes and goes
            weights = [8, 1, 1, 1]
            regions = {
                r: kinds[rng.choices(list(kinds), weights)[0]](r)
                for r in rng.sample(["iad", "cdg", "nrt"], rng.randint(1, 3))
            }
            changed = doubt.update(app, regions.values())
            latest[app] = regions
        assert doubt.active is doubt_own_connectivity(latest)
        assert changed is (doubt.active != before)
        seen[doubt.active] += 1
    assert min(seen.values()) > 50, seen  # both ways, many times
