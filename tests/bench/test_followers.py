"""bench.followers: the lag of a stream's events at its own client and at a follower on another
replica, measured from send times the upstream writes into the deltas."""

from __future__ import annotations

import re
import shutil

import pytest

from bench import followers


def test_both_clients_get_every_delta_and_their_lags_are_reported(capsys: pytest.CaptureFixture[str]) -> None:
    assert followers.main(["--backend", "sqlite", "--runs", "2", "--deltas", "8", "--ms", "5"]) == 0
    out = capsys.readouterr().out
    assert "sqlite (2 streams of 8 deltas 5 ms apart, 10 deltas counted):" in out  # 2 × (8 − 3)
    lags = {
        who: [float(v) for v in values]
        for who, *values in re.findall(r"^  (A's own client|B's follower) +p50 ([\d.]+)  p99 ([\d.]+)  max ([\d.]+) ms$", out, re.MULTILINE)
    }
    assert set(lags) == {"A's own client", "B's follower"}
    for p50, p99, most in lags.values():
        assert 0 <= p50 <= p99 <= most  # real arrivals after their send times, in order
    shutil.rmtree(re.search(r"logs and databases: (.+)$", out, re.MULTILINE).group(1), ignore_errors=True)  # type: ignore[union-attr]


def test_the_upstream_stamps_each_delta_with_its_send_time() -> None:
    import time

    import httpx
    import orjson

    from gateway.testing.serving import serve_app

    with serve_app(followers.timestamping_upstream(3, 0.001)) as url:
        before = time.time()
        reply = httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": []})
        after = time.time()
    chunks = [orjson.loads(line[6:]) for line in reply.text.split("\n") if line.startswith("data: {")]
    texts = [c["choices"][0]["delta"].get("content") for c in chunks]
    stamps = [float(text) for text in texts if text]  # the first delta (the role) is empty
    assert len(stamps) == 3 and before <= stamps[0] <= stamps[1] <= stamps[2] <= after
    assert reply.text.endswith("data: [DONE]\n\n")
