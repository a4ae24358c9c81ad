"""deploy/grafana-dashboard.json, checked offline (no Grafana, no Prometheus): a well-formed
dashboard that imports as is (a ``DS_PROMETHEUS`` data source input and variable, ``queue`` and
``channel`` variables), panels laid out without overlaps, and PromQL that only names metrics the
poller serves (the names the collector yields, not a copy of them), filters every selector on
both variables, rates counters and not gauges, and covers throughput, in flight, errors,
latency and restarts, and every metric the poller serves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from poller.metrics import PollerCollector
from poller.stats import SLOTS

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"

DS_UID = "${DS_PROMETHEUS}"
GRID_WIDTH = 24
FILTERS = {("queue", "=~", "$queue"), ("channel", "=~", "$channel")}
# A metric name with its label matchers: `name{label op "value", ...}`. The dashboard's
# expressions give every metric matchers (checked below), so this finds every metric they use.
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^{}]*)\}")
MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
POLLER_NAME = re.compile(r"\bsqs_poller_[a-zA-Z0-9_:]*")
QUANTILES = ("0.5", "0.95", "0.99")


# -- what the poller serves ------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    samples: dict[str, str]  # sample name (`_total`, `_bucket`, `_sum`, `_count` included) -> family type
    families: dict[str, str]  # family name -> type
    family_of: dict[str, str]  # sample name -> family name
    labels: frozenset[str]  # label names on the samples, `le` aside


@pytest.fixture(scope="module")
def served() -> Served:
    """Run the collector on made-up totals and take the names it yields."""
    totals = [i % 7 for i in range(SLOTS)]
    collector = PollerCollector(totals=lambda: totals, workers=lambda: 2, restarts=lambda: 1,
                                queue="orders", channel="http", healthy=lambda: 2, target=lambda: 2)
    samples: dict[str, str] = {}
    families: dict[str, str] = {}
    family_of: dict[str, str] = {}
    labels: set[str] = set()
    for family in collector.collect():
        families[family.name] = family.type
        for sample in family.samples:
            samples[sample.name] = family.type
            family_of[sample.name] = family.name
            labels.update(k for k in sample.labels if k != "le")
    assert families and samples, "the collector yielded nothing"
    return Served(samples, families, family_of, frozenset(labels))


# -- the dashboard ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    assert DASHBOARD.is_file(), f"{DASHBOARD.relative_to(ROOT)} is missing"
    body = json.loads(DASHBOARD.read_text())
    assert isinstance(body, dict)
    return body


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and those inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _charts(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in _panels(dashboard["panels"]) if p.get("type") != "row"]


def _exprs(panel: dict[str, Any]) -> list[str]:
    return [t["expr"] for t in panel.get("targets", []) if not t.get("hide")]


def _all_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], e) for p in _charts(dashboard) for e in _exprs(p)]


def _variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def _variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return query["query"] if isinstance(query, dict) else query


def _matchers(text: str) -> set[tuple[str, str, str]]:
    found, pos = set(), 0
    text = text.strip()
    while pos < len(text):
        m = MATCHER.match(text, pos)
        assert m, f"cannot parse label matchers {text!r} at {text[pos:]!r}"
        found.add((m.group(1), m.group(2), m.group(3)))
        pos = m.end()
    return found


def _selectors(expr: str) -> list[tuple[str, set[tuple[str, str, str]], int, int]]:
    """(metric, matchers, start, end) for each selector of an expression."""
    return [(m.group(1), _matchers(m.group(2)), m.start(), m.end()) for m in SELECTOR.finditer(expr)]


def _datasources(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield f"{path}.{key}", value
            else:
                yield from _datasources(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _datasources(value, f"{path}[{i}]")


# -- well-formed -----------------------------------------------------------------------------


def test_dashboard_header(dashboard: dict[str, Any]) -> None:
    assert isinstance(dashboard.get("title"), str) and dashboard["title"].strip()
    uid = dashboard.get("uid")
    assert isinstance(uid, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid), f"bad uid {uid!r}"
    assert isinstance(dashboard.get("schemaVersion"), int) and 36 <= dashboard["schemaVersion"] <= 41
    # id null: an import creates the dashboard instead of overwriting whichever has that id.
    assert dashboard.get("id") is None
    assert dashboard.get("time", {}).get("from") and dashboard["time"].get("to")
    assert isinstance(dashboard.get("panels"), list) and dashboard["panels"]


def test_panels_have_targets(dashboard: dict[str, Any]) -> None:
    ids = [p.get("id") for p in _panels(dashboard["panels"])]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    charts = _charts(dashboard)
    assert charts
    for panel in charts:
        name = panel.get("title")
        assert isinstance(name, str) and name.strip(), f"panel {panel.get('id')} has no title"
        assert panel.get("type") in {"timeseries", "stat", "gauge", "bargauge", "table", "heatmap"}, name
        targets = panel.get("targets")
        assert isinstance(targets, list) and targets, f"{name}: no targets"
        refs = [t.get("refId") for t in targets]
        assert all(refs) and len(refs) == len(set(refs)), f"{name}: refIds {refs}"
        for target in targets:
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), f"{name}: empty expr"
            assert target["expr"].count("(") == target["expr"].count(")"), f"{name}: unbalanced {target['expr']}"
            assert target.get("datasource", {}).get("uid") == DS_UID, f"{name}: target datasource"
    for row in (p for p in _panels(dashboard["panels"]) if p.get("type") == "row"):
        assert not row.get("targets"), f"row {row.get('title')} has targets"


def test_grid_positions_do_not_overlap(dashboard: dict[str, Any]) -> None:
    # Panels inside a collapsed row are laid out when it opens, below it: check the visible ones.
    boxes = []
    for panel in dashboard["panels"]:
        grid = panel.get("gridPos")
        name = panel.get("title")
        assert isinstance(grid, dict), f"{name}: no gridPos"
        x, y, w, h = (grid.get(k) for k in ("x", "y", "w", "h"))
        assert all(isinstance(v, int) for v in (x, y, w, h)), f"{name}: gridPos {grid}"
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= GRID_WIDTH, f"{name}: gridPos {grid}"
        boxes.append((name, x, y, w, h))
    for i, (a, ax, ay, aw, ah) in enumerate(boxes):
        for b, bx, by, bw, bh in boxes[i + 1:]:
            overlap = ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
            assert not overlap, f"panels {a!r} and {b!r} overlap"


def test_prometheus_datasource_input_and_variable(dashboard: dict[str, Any]) -> None:
    # The input: the import dialog asks for the Prometheus and puts its uid in for ${DS_PROMETHEUS}.
    inputs = {i["name"]: i for i in dashboard.get("__inputs", [])}
    assert inputs.get("DS_PROMETHEUS", {}).get("type") == "datasource"
    assert inputs["DS_PROMETHEUS"].get("pluginId") == "prometheus"
    # The variable: provisioned from a file (no import dialog), ${DS_PROMETHEUS} is this.
    variable = _variables(dashboard).get("DS_PROMETHEUS")
    assert variable and variable["type"] == "datasource" and variable["query"] == "prometheus"
    refs = list(_datasources(dashboard))
    assert refs
    for where, ref in refs:
        if ".annotations." in where:
            continue  # the built-in annotations query Grafana itself
        assert ref == {"type": "prometheus", "uid": DS_UID}, f"{where}: {ref}"


def test_queue_and_channel_variables(dashboard: dict[str, Any], served: Served) -> None:
    variables = _variables(dashboard)
    for name in ("queue", "channel"):
        variable = variables.get(name)
        assert variable, f"no {name!r} variable"
        assert variable["type"] == "query"
        assert variable.get("includeAll") and variable.get("multi"), f"{name}: All and multi-value"
        # Without it "All" becomes an alternation of the values seen at load time.
        assert variable.get("allValue") == ".*"
        query = _variable_query(variable)
        m = re.fullmatch(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^{}]*\})?\s*,\s*(\w+)\s*\)", query)
        assert m, f"{name}: {query!r}"
        assert m.group(1) == "sqs_poller_messages_received_total" and m.group(3) == name
        assert m.group(1) in served.samples
    assert {"queue", "channel"} <= served.labels, f"the collector's labels are {sorted(served.labels)}"


# -- PromQL ----------------------------------------------------------------------------------


def test_expressions_use_only_served_metrics(dashboard: dict[str, Any], served: Served) -> None:
    for title, expr in _all_exprs(dashboard):
        selectors = _selectors(expr)
        assert selectors, f"{title}: no metric selector in {expr}"
        for metric, _, _, _ in selectors:
            assert metric in served.samples, (
                f"{title}: {metric} is not served (poller/metrics.py serves {sorted(served.samples)})")
        # A poller metric without matchers would escape the selector check above.
        named = POLLER_NAME.findall(expr)
        assert len(named) == len(selectors), f"{title}: a metric without label matchers in {expr}"
        for name in named:
            assert name in served.samples, f"{title}: {name} is not served"
    for name, variable in _variables(dashboard).items():
        if variable["type"] == "query":
            for metric in POLLER_NAME.findall(_variable_query(variable)):
                assert metric in served.samples, f"variable {name}: {metric} is not served"


def test_every_selector_filters_on_queue_and_channel(dashboard: dict[str, Any]) -> None:
    for title, expr in _all_exprs(dashboard):
        for metric, matchers, _, _ in _selectors(expr):
            missing = FILTERS - matchers
            assert not missing, f"{title}: {metric} lacks {sorted(missing)} in {expr}"


def test_counters_are_rated_and_gauges_are_not(dashboard: dict[str, Any], served: Served) -> None:
    for title, expr in _all_exprs(dashboard):
        for metric, _, start, end in _selectors(expr):
            ranged = re.match(r"\s*\[[^\]]+\]", expr[end:])
            kind = served.samples.get(metric)
            if kind is None:
                continue  # not served: test_expressions_use_only_served_metrics says so
            if kind == "gauge":
                assert not ranged, f"{title}: gauge {metric} taken over a range in {expr}"
            else:
                wrapped = re.search(r"\b(rate|increase|irate)\(\s*$", expr[:start])
                assert ranged and wrapped, f"{title}: counter {metric} not in rate()/increase() in {expr}"


def test_quantiles_over_bucket_rates_by_le(dashboard: dict[str, Any], served: Served) -> None:
    for title, expr in _all_exprs(dashboard):
        if "histogram_quantile" not in expr:
            continue
        assert re.match(r"histogram_quantile\(\s*0?\.\d+\s*,", expr), f"{title}: {expr}"
        assert re.search(r"\bby\s*\([^)]*\ble\b[^)]*\)", expr), f"{title}: not aggregated by le: {expr}"
        metrics = [m for m, _, _, _ in _selectors(expr)]
        assert metrics and all(m.endswith("_bucket") and served.samples.get(m) == "histogram" for m in metrics), (
            f"{title}: histogram_quantile over {metrics}")


# -- coverage --------------------------------------------------------------------------------


def _panel_metrics(panel: dict[str, Any]) -> set[str]:
    return {m for e in _exprs(panel) for m, _, _, _ in _selectors(e)}


def _find_panel(dashboard: dict[str, Any], metrics: set[str], kind: str = "timeseries") -> dict[str, Any] | None:
    for panel in _charts(dashboard):
        if panel["type"] == kind and metrics <= _panel_metrics(panel):
            return panel
    return None


TOPICS = {
    "throughput": {"sqs_poller_messages_received_total", "sqs_poller_messages_acked_total",
                   "sqs_poller_messages_deleted_total"},
    "in flight": {"sqs_poller_messages_in_flight"},
    "circuit open": {"sqs_poller_circuit_open"},
    "errors and decisions": {"sqs_poller_delivery_retries_total", "sqs_poller_messages_returned_total",
                             "sqs_poller_messages_rejected_total", "sqs_poller_delete_failures_total",
                             "sqs_poller_receipts_expired_total", "sqs_poller_receive_errors_total"},
    "visibility extensions": {"sqs_poller_visibility_extensions_total"},
    "workers alive": {"sqs_poller_workers", "sqs_poller_workers_healthy", "sqs_poller_workers_target"},
    "restarts": {"sqs_poller_worker_restarts_total"},
}


@pytest.mark.parametrize("topic", sorted(TOPICS))
def test_topic_has_a_panel(dashboard: dict[str, Any], served: Served, topic: str) -> None:
    metrics = TOPICS[topic]
    assert metrics <= served.samples.keys(), f"{topic}: the poller no longer serves {metrics - served.samples.keys()}"
    assert _find_panel(dashboard, metrics), f"no time series panel charts {topic}: {sorted(metrics)}"


def test_latency_has_quantiles_per_histogram(dashboard: dict[str, Any], served: Served) -> None:
    histograms = [name for name, kind in served.families.items() if kind == "histogram"]
    assert len(histograms) == 4, histograms
    for family in histograms:
        bucket = f"{family}_bucket"
        panel = _find_panel(dashboard, {bucket})
        assert panel, f"no latency panel for {family}"
        assert panel["fieldConfig"]["defaults"].get("unit") == "s", f"{panel['title']}: unit"
        quantiles = {m.group(1) for e in _exprs(panel)
                     for m in [re.match(r"histogram_quantile\(\s*([0-9.]+)\s*,", e)] if m and bucket in e}
        assert set(QUANTILES) <= quantiles, f"{panel['title']}: quantiles {sorted(quantiles)}"


def test_every_served_metric_is_charted(dashboard: dict[str, Any], served: Served) -> None:
    """A metric added to poller/metrics.py fails here until the dashboard shows it."""
    used = {m for _, e in _all_exprs(dashboard) for m, _, _, _ in _selectors(e)}
    charted = {served.family_of[m] for m in used if m in served.family_of}
    assert charted == set(served.families), f"not on the dashboard: {sorted(set(served.families) - charted)}"


def test_the_operations_guide_names_the_dashboard() -> None:
    text = OPERATIONS.read_text()
    section = text.split("## Health and metrics", 1)[1].split("\n## ", 1)[0]
    assert str(DASHBOARD.relative_to(ROOT)) in section
