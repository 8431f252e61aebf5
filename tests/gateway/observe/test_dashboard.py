"""The Grafana dashboard in docs/grafana uses only metrics the gateway exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from gateway.observe.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[3] / "docs" / "grafana" / "stepchain.json"


def test_every_dashboard_query_names_an_exported_metric() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    exported = {
        sample_name
        for family in registry.collect()
        for sample_name in (family.name, family.name + "_total", family.name + "_bucket",
                            family.name + "_count", family.name + "_sum")
    }
    dashboard = json.loads(DASHBOARD.read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"stepchain_\w+", target["expr"])
    }
    assert used and used <= exported, used - exported
    assert len(used) >= 12
