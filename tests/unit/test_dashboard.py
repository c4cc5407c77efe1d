"""The operators' Grafana dashboard (deploy/grafana/) is well formed, and a PromQL metric-name
tokenizer that tests/integration/test_dashboard_metrics.py uses to check every name exists.

No network: only the JSON and YAML files are read.

The tokenizer (:func:`metric_names`) finds the metric names of one PromQL expression (or
Grafana template query): identifiers that are not a function call (followed by ``(``), not
a PromQL keyword or aggregation operator (``sum``, ``by``, ``and``, ``offset``, ``bool``…),
not inside a label matcher ``{…}``, a range or subquery ``[…]``, a string, a grouping list
(``by (…)``, ``on (…)``, ``group_left (…)``…) or a Grafana variable (``$x``, ``${x}``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

__all__ = ["DASHBOARD", "dashboard_queries", "load_dashboard", "metric_names", "series_names"]

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "headrace.json"

#: PromQL words that are never metric names: aggregation operators, binary/set operators,
#: modifiers and number literals (functions are recognised by the ``(`` that follows them)
KEYWORDS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
})
#: words followed by a parenthesised list of label names (not expressions)
_LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?[a-zA-Z0-9_]*")


def _skip_string(s: str, i: int) -> int:
    """Index just past the string literal that starts at ``s[i]`` (``"``, ``'`` or backtick)."""
    quote, i = s[i], i + 1
    while i < len(s) and s[i] != quote:
        i += 2 if s[i] == "\\" and quote != "`" else 1
    return i + 1


def _skip_group(s: str, i: int, close: str) -> int:
    """Index just past the ``close`` that ends the group opened at ``s[i]`` (strings skipped)."""
    opener, depth = s[i], 0
    while i < len(s):
        c = s[i]
        if c in "\"'`":
            i = _skip_string(s, i)
            continue
        if c == opener:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i


def _next_char(s: str, i: int) -> str:
    while i < len(s) and s[i].isspace():
        i += 1
    return s[i] if i < len(s) else ""


def _promql(query: str) -> str:
    """The PromQL inside a Grafana Prometheus template query (``label_values(expr, label)``,
    ``query_result(expr)``); "" for queries naming no metric (``label_values(label)``,
    ``label_names()``, ``metrics(regex)``); the query itself otherwise."""
    q = query.strip()
    m = re.fullmatch(r"(label_values|query_result|label_names|metrics)\s*\((.*)\)", q, re.S)
    if m is None:
        return q
    func, inner = m.groups()
    if func == "query_result":
        return inner
    if func != "label_values":
        return ""
    depth, cut = 0, -1
    for i, c in enumerate(inner):  # the last top-level comma splits expr from label
        depth += c in "({["
        depth -= c in ")}]"
        if c == "," and depth == 0:
            cut = i
    return inner[:cut] if cut >= 0 else ""


def metric_names(expr: str) -> set[str]:
    """The metric names an expression queries, exactly as written (``x_bucket`` stays).

    Args:
        expr: a PromQL expression, possibly with Grafana variables, or a Grafana template
            query (``label_values(…)``, ``query_result(…)``).

    Returns:
        The set of metric names; empty for an expression that names none (``time()``).
    """
    s = _promql(expr)
    names: set[str] = set()
    i = 0
    while i < len(s):
        c = s[i]
        if c in "\"'`":
            i = _skip_string(s, i)
        elif c == "{":
            i = _skip_group(s, i, "}")
        elif c == "[":
            i = _skip_group(s, i, "]")
        elif c == "#":  # a comment runs to the end of the line
            end = s.find("\n", i)
            i = len(s) if end < 0 else end
        elif c == "$":
            if s.startswith("${", i):
                i = _skip_group(s, i + 1, "}")
            else:
                m = _IDENT.match(s, i + 1)
                i = i + 1 + (len(m.group()) if m else 0)
        elif c.isdigit() or (c == "." and s[i + 1:i + 2].isdigit()):
            m = _NUMBER.match(s, i)
            i += len(m.group()) if m else 1
        elif (m := _IDENT.match(s, i)) is not None:
            word, i = m.group(), m.end()
            nxt = _next_char(s, i)
            if word.lower() in _LABEL_LISTS and nxt == "(":
                i = _skip_group(s, s.index("(", i), ")")
            elif nxt != "(" and word.lower() not in KEYWORDS:
                names.add(word)
        else:
            i += 1
    return names


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    """The dashboard JSON as a dict."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """Every PromQL expression of the dashboard as ``(where, expr)``: the panels' targets
    (``where`` = the panel title) and the query variables (``where`` = ``variable $name``)."""
    found: list[tuple[str, str]] = []
    for panel in _panels(dashboard):
        found += [(str(panel.get("title")), t["expr"]) for t in panel.get("targets", [])
                  if t.get("expr")]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query or "")
            if text:
                found.append((f"variable ${var['name']}", text))
    return found


def series_names(family: Any) -> set[str]:
    """The series names Prometheus stores for one ``prometheus_client`` metric family
    (from ``registry.collect()`` or the text parser): a counter ``x`` is ``x_total``, a
    histogram ``x`` is ``x_bucket``/``x_sum``/``x_count``, plus every sample's own name —
    whether or not the family has samples yet."""
    name, kind = family.name, family.type
    names = {s.name for s in family.samples}
    if kind == "counter":
        names.add(name if name.endswith("_total") else f"{name}_total")
    elif kind in ("histogram", "gaugehistogram"):
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    elif kind == "summary":
        names |= {name, f"{name}_sum", f"{name}_count"}
    elif kind == "info":
        names.add(name if name.endswith("_info") else f"{name}_info")
    else:
        names.add(name)
    return names


# ------------------------------------------------------------------ the tokenizer
@pytest.mark.parametrize(("expr", "want"), [
    ("up", {"up"}),
    ('sum by (topic) (rate(headrace_events_in_total{topic=~"a|b"}[$__rate_interval]))',
     {"headrace_events_in_total"}),
    ("histogram_quantile(0.99, sum by (le, method) "
     "(rate(headrace_serving_request_seconds_bucket[5m])))",
     {"headrace_serving_request_seconds_bucket"}),
    ("sum(rate(a_total[1m])) / ignoring (tier) group_left sum(rate(b_total[1m]))",
     {"a_total", "b_total"}),
    ("x * on (model_version) group_left (feature) y", {"x", "y"}),
    ("time() - max(last_success_seconds)", {"last_success_seconds"}),
    ("max by (status) (headrace_rollout_status) == 1", {"headrace_rollout_status"}),
    ('label_replace(m{a="}"}, "dst", "$1", "src", "(.*)")', {"m"}),
    ("a offset 5m > bool 1e-3 and b unless c or d", {"a", "b", "c", "d"}),
    ("SUM BY (x) (m) + Inf", {"m"}),
    ("rate(m[5m:30s]) @ start() + -0.5 * 0x1f", {"m"}),
    ("avg_over_time(rec:rule:ratio5m[1h])", {"rec:rule:ratio5m"}),
    ("max(g{model_version=\"$champion\", window=\"${window}\"}) - 0.02", {"g"}),
    ("topk(5, foo) # a trailing comment naming bar", {"foo"}),
    ("label_values(headrace_drift_psi, window)", {"headrace_drift_psi"}),
    ('label_values(m{job="x"}, instance)', {"m"}),
    ("label_values(window)", set()),
    ("query_result(max by (version) (model_info) == 1)", {"model_info"}),
    ("vector(1)", set()),
])
def test_metric_names(expr: str, want: set[str]) -> None:
    assert metric_names(expr) == want


def test_series_names_of_each_kind() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    r = CollectorRegistry()
    Counter("c", "h", ["l"], registry=r)
    Counter("d_total", "h", registry=r).inc()
    Gauge("g", "h", ["l"], registry=r)
    Histogram("h_seconds", "h", ["m"], registry=r)
    got = set().union(*(series_names(f) for f in r.collect()))
    assert got == {"c_total", "d_total", "d_created", "g", "h_seconds_bucket", "h_seconds_sum",
                   "h_seconds_count"}


# ------------------------------------------------------------------ the dashboard
@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def _leaves(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in _panels(dashboard) if p.get("type") != "row"]


def test_dashboard_is_provisionable(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    assert "id" not in dashboard or dashboard["id"] is None  # provisioning assigns it
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert len(names) == len(set(names))
    (ds,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"


def test_panel_ids_unique_and_layout_fits(dashboard: dict[str, Any]) -> None:
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_every_panel_has_the_datasource_variable_and_targets(
        dashboard: dict[str, Any]) -> None:
    leaves = _leaves(dashboard)
    assert len(leaves) >= 30
    for p in leaves:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], f"{p['title']} has no target"
        assert p.get("description"), f"{p['title']} has no description"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert t["expr"].strip() and metric_names(t["expr"]), (p["title"], t["expr"])
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}", var["name"]


def test_rows_in_order(dashboard: dict[str, Any]) -> None:
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Stream", "Serving", "Drift & performance", "Rollout", "Pipeline"]


def _panel(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    (panel,) = [p for p in _leaves(dashboard) if p["title"] == title]
    return panel


def _steps(panel: dict[str, Any]) -> list[tuple[str, float | None]]:
    defaults = panel["fieldConfig"]["defaults"]
    assert defaults["custom"]["thresholdsStyle"]["mode"] != "off", panel["title"]
    return [(s["color"], s["value"]) for s in defaults["thresholds"]["steps"]]


@pytest.mark.parametrize("title", ["Feature PSI (champion)", "Prediction PSI (champion)",
                                   "Context PSI (champion)"])
def test_psi_panels_draw_the_warn_and_alert_thresholds(
        dashboard: dict[str, Any], title: str) -> None:
    panel = _panel(dashboard, title)
    assert _steps(panel) == [("green", None), ("yellow", 0.1), ("red", 0.25)]
    (target,) = panel["targets"]
    assert metric_names(target["expr"]) == {"headrace_drift_psi"}
    assert 'model_version="$champion"' in target["expr"]


def test_calibration_panel_draws_the_band(dashboard: dict[str, Any]) -> None:
    panel = _panel(dashboard, "Calibration ratio")
    assert _steps(panel) == [("red", None), ("green", 0.85), ("red", 1.15)]


# ------------------------------------------------------------------ provisioning
def test_datasource_provisioning_matches_the_variable(dashboard: dict[str, Any]) -> None:
    prov = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
                          .read_text())
    (ds,) = prov["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert ds["uid"] == "prometheus" and ds["isDefault"] is True
    (var,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert var["current"]["value"] == ds["uid"]


def test_dashboard_provider_points_at_the_mounted_folder() -> None:
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "headrace.yml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = {m.split(":")[1]: m.split(":")[0] for m in compose["services"]["grafana"]["volumes"]}
    path = provider["options"]["path"]
    assert mounts[path] == "./deploy/grafana/dashboards"
    assert (ROOT / mounts[path] / DASHBOARD.name).is_file()


def test_job_matchers_name_scrape_jobs(dashboard: dict[str, Any]) -> None:
    """``job`` matchers in the dashboard select jobs deploy/prometheus.yml defines."""
    jobs = {j["job_name"] for j in yaml.safe_load((ROOT / "deploy" / "prometheus.yml")
                                                  .read_text())["scrape_configs"]}
    seen = 0
    for where, expr in dashboard_queries(dashboard):
        for op, value in re.findall(r'\bjob\s*(=~|!~|!=|=)\s*"([^"]*)"', expr):
            seen += 1
            matched = {j for j in jobs if re.fullmatch(value, j)} if "~" in op else \
                {j for j in jobs if j == value}
            assert matched, f"{where!r}: job{op}{value!r} matches no job in {sorted(jobs)}"
    assert seen >= 2
