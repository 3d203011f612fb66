"""`flywatch demo --fast`: the embedded default runs end to end as a process, and says what happened."""

from __future__ import annotations

import os
import subprocess
import sys

from daemon.demo import Step, Story, render, summary


def test_the_demo_plays_its_whole_story() -> None:
    """Scaled up in cdg, nrt's demand moved and back, the bad release rolled back, scaled down: exit 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWATCH_", "FLY_"))}
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "demo", "--fast", "--plain"],
        capture_output=True,
        text=True,
        timeout=110,
        env=env,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "/metrics" in out
    assert "/status" in out
    summary_text = out[out.index("summary:") :]
    assert "ok   a load spike in cdg" in summary_text
    assert "cdg 1 -> 3 machines, and only there" in summary_text
    assert "its demand moved to" in summary_text
    assert "ok   nrt recovers" in summary_text
    assert "the capacity moved for it is given back" in summary_text
    assert "rolled back to v1" in summary_text
    assert "back to one machine per region" in summary_text
    window = float(summary_text.split("taken down in")[1].split("the first ")[1].split("s after")[0])
    assert window >= 7.0  # the first scale-down waited for the stabilization window (8s, ticks of 1s)
    assert "all of it happened, by itself" in summary_text


def test_the_summary_says_what_did_not_happen() -> None:
    """A step that timed out is marked FAIL with why, and the story is not ok."""
    story = Story(
        [
            Step("steady state", ok=True, detail="fine", seconds=1.0),
            Step("the load drops", detail="not within 60s"),
        ]
    )
    text = summary(story)
    assert not story.ok
    assert "FAIL the load drops" in text
    assert "not within 60s" in text
    assert "some of it did not happen" in text


def test_the_live_view_shows_each_region_and_the_release() -> None:
    """The view has a row per region with machines, health, load, desired and the last decision's reason."""
    world = {
        "load": {"iad": 95.0, "cdg": 270.0, "nrt": 95.0},
        "machines": [
            {"region": "iad", "state": "started"},
            {"region": "cdg", "state": "started"},
            {"region": "cdg", "state": "starting"},
            {"region": "nrt", "state": "destroyed"},
        ],
    }
    status = {
        "apps": {
            "shop": {
                "regions": {
                    "cdg": {
                        "health": "healthy",
                        "desired": 3,
                        "last_decision": {
                            "action": "scale_up",
                            "rule": "target_tracking",
                            "reason": "13.5 / 5",
                        },
                    }
                }
            }
        },
        "releases": {
            "shop": {
                "watched": {"version": 2, "verdict": "failing", "reason": "error ratio 20%"},
                "rollback": {"from": {"version": 2}, "to": {"version": 1}, "state": "running"},
            }
        },
    }
    text = render(world, status, "a load spike", 12.0)
    cdg = next(line for line in text.splitlines() if line.startswith("cdg"))
    assert cdg.split()[:6] == ["cdg", "1", "1", "healthy", "270", "3"]
    assert "scale_up: target_tracking: 13.5 / 5" in cdg
    nrt = next(line for line in text.splitlines() if line.startswith("nrt"))
    assert nrt.split()[:4] == ["nrt", "0", "0", "-"]
    assert "release: v2 failing (error ratio 20%); rollback v2 -> v1 running" in text
