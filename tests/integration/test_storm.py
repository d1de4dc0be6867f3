"""A node restart with 200 connectors: reconnects spread out in time and none is lost (issue 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway_harness import subprocess_env, wait_until

STORM = Path(__file__).with_name("storm.py")
N = 200


def up_events(log_text: str) -> list[dict]:
    """Every "connector ... up on tunnel" event in a JSON log."""
    events = []
    for line in log_text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if "up on tunnel" in event.get("log_format", ""):
            events.append(event)
    return events


def up_times(log_text: str) -> list[float]:
    return [e["log_time"] for e in up_events(log_text)]


@pytest.mark.timeout(240)
def test_two_hundred_connectors_come_back_spread_out_after_a_node_restart(gw, tmp_path):
    """After kill -9 and restart of the node, all 200 simulated connectors reconnect, spread over seconds."""
    # The 200 simulated connectors stand for 200 sites but all come from 127.0.0.1: lift the
    # per-address limits on unauthenticated connections and enrolments that would be theirs.
    svc = gw.service(logging={"format": "json"}, service={"max_handshakes": 32, "max_unauthenticated_per_address": N,
                                                          "enrolments_per_minute": N})
    base = tmp_path / "sims"
    env = subprocess_env()
    subprocess.run([sys.executable, str(STORM), "register", str(svc.state_dir), svc.address, str(base), str(N)],
                   check=True, timeout=120, env=env, capture_output=True)
    sims = gw.spawn("sims", [sys.executable, str(STORM), "run", str(base), str(N), "1.0", "8.0",
                             str(tmp_path / "sims.jsonl")], env=env)
    wait_until(lambda: len(up_times(svc.proc.log())) >= N, 90, f"{N} connectors up")

    svc.kill9()
    restarted = svc.start()
    wait_until(lambda: len(up_times(restarted.log())) >= N, 120, f"all {N} connectors back after the restart")
    times = sorted(up_times(restarted.log()))
    assert len({e.get('connector_id') for e in up_events(restarted.log())}) == N, "some connector did not come back"
    spread = times[-1] - times[0]
    per_second: dict[int, int] = {}
    for t in times:
        per_second[int(t - times[0])] = per_second.get(int(t - times[0]), 0) + 1
    curve = " ".join(f"{s}s:{per_second.get(s, 0)}" for s in range(int(spread) + 1))
    (tmp_path / "curve.txt").write_text(curve + "\n")
    shed = restarted.log().count("refusing new tunnels for now")
    print(f"reconnect curve (handshakes completed per second after the first): {curve};"
          f" max_handshakes shed load {shed} times")
    buckets: dict[int, int] = {}
    for t in times:
        buckets[int((t - times[0]) * 10)] = buckets.get(int((t - times[0]) * 10), 0) + 1
    assert max(buckets.values()) <= N // 3, f"a thundering herd: {max(buckets.values())} in one 100 ms ({curve})"
    assert sims.running

