"""The Grafana dashboard k8s/grafana-dashboard.json: valid Grafana JSON, a panel for each of our
``ray_atelier_*`` metrics, and only metric names that atelier3d or Ray Serve 2.60 export."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "k8s" / "grafana-dashboard.json"
METRICS_MODULE = ROOT / "atelier3d" / "metrics.py"
HISTOGRAM_SERIES = ("_bucket", "_count", "_sum")

# Ray Serve's own metrics used by the dashboard, as Ray 2.60's Prometheus endpoint names them:
# Ray prefixes "ray_", a Counter is exported with a "_total" suffix (metrics_agent.py emits a
# prometheus_client CounterMetricFamily; tests/test_metrics.py scrapes the real
# ray_serve_num_http_requests* and ray_atelier_embedding_cache_total) and a Histogram as
# _bucket/_count/_sum. Value: (kind, file under ray/serve/_private/ that defines it, the name as
# written there). The HTTP ones are f-strings of RequestIngressMetrics, protocol_name "http".
RAY_SERVE_METRICS = {
    # proxy.py -> RequestIngressMetrics: tags route, method, application, status_code
    "ray_serve_num_http_requests_total": (
        "counter", "request_ingress_metrics.py", 'f"serve_num_{protocol_name}_requests"'),
    # tags route, error_code, method, application
    "ray_serve_num_http_error_requests_total": (
        "counter", "request_ingress_metrics.py", 'f"serve_num_{protocol_name}_error_requests"'),
    # tags deployment, error_code, method, route, application
    "ray_serve_num_deployment_http_error_requests_total": (
        "counter", "request_ingress_metrics.py",
        'f"serve_num_deployment_{protocol_name}_error_requests"'),
    # end-to-end latency at the proxy; tags method, route, application, status_code
    "ray_serve_http_request_latency_ms": (
        "histogram", "request_ingress_metrics.py", 'f"serve_{protocol_name}_request_latency_ms"'),
    # replica.py: counted in each replica (deployment, replica, application + route)
    "ray_serve_deployment_request_counter_total": (
        "counter", "replica.py", '"serve_deployment_request_counter"'),
    # router.py: gauges of the callers' routers; tags deployment, application, handle, actor_id
    "ray_serve_deployment_queued_queries": (
        "gauge", "router.py", '"serve_deployment_queued_queries"'),
    "ray_serve_num_ongoing_requests_at_replicas": (
        "gauge", "router.py", '"serve_num_ongoing_requests_at_replicas"'),
    # deployment_state.py: the controller's health gauge, 1 per healthy replica (per-replica
    # series, RAY_SERVE_CONTROLLER_METRICS_INCLUDE_HIGH_CARDINALITY_TAGS defaults to on)
    "ray_serve_deployment_replica_healthy": (
        "gauge", "deployment_state.py", '"serve_deployment_replica_healthy"'),
}

PROMQL_WORDS = {  # functions, aggregations and keywords; never metric names
    "sum", "rate", "irate", "increase", "histogram_quantile", "by", "without", "avg", "max",
    "min", "count", "le", "on", "ignoring", "and", "or", "unless", "clamp_min", "topk",
}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return panels


def exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", [])]


def our_metrics() -> dict[str, str]:
    """Exported name -> kind of every metric atelier3d/metrics.py defines, read from its source
    (metrics.Counter/Gauge/Histogram("name", ...)), with Ray's prefix and counter suffix."""
    found = {}
    for node in ast.walk(ast.parse(METRICS_MODULE.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("Counter", "Gauge", "Histogram")):
            name = "ray_" + node.args[0].value
            kind = node.func.attr.lower()
            if kind == "counter" and not name.endswith("_total"):
                name += "_total"
            found[name] = kind
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names of an expression: identifiers that open a selector ``{`` or a range
    ``[``, or any ``ray_*`` identifier; labels, functions and grouping are left out."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values and regexes
    names = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]", expr))
    names |= set(re.findall(r"\b(ray_[a-zA-Z0-9_:]+)", expr))
    return {n for n in names if n not in PROMQL_WORDS and not n.startswith("$")}


def base_name(series: str, known: dict[str, str]) -> str:
    """The metric a series belongs to (histograms are queried as _bucket/_count/_sum)."""
    for suffix in HISTOGRAM_SERIES:
        stem = series.removesuffix(suffix)
        if series.endswith(suffix) and known.get(stem) == "histogram":
            return stem
    return series


def test_dashboard_is_grafana_json(dashboard):
    assert dashboard["title"] and dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for panel in panels:
        assert panel["type"] and panel["title"]
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= grid.keys(), panel["title"]
        assert all(isinstance(grid[k], int) and grid[k] >= 0 for k in "hwxy")
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        here = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not here & cells, f"{panel['title']} overlaps another panel"
        cells |= here
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in targets:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert target["expr"].count("{") == target["expr"].count("}"), target["expr"]


def test_template_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("application", "deployment"):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"]["uid"] == "${datasource}"
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert re.fullmatch(rf"label_values\((\w+)(\{{.*\}})?, {name}\)", query), query
        assert metric_names(query) <= RAY_SERVE_METRICS.keys(), query
    used = set(re.findall(r"\$\{?(\w+)", " ".join(exprs(dashboard))))
    assert used - {"__rate_interval", "__interval", "__range"} <= variables.keys()


def test_every_metric_of_ours_has_a_panel(dashboard):
    ours = our_metrics()
    assert len(ours) == 6 and all(n.startswith("ray_atelier_") for n in ours)
    used = {base_name(n, ours) for e in exprs(dashboard) for n in metric_names(e)}
    assert not ours.keys() - used, f"no panel for {sorted(ours.keys() - used)}"
    histograms = {n for n, kind in ours.items() if kind == "histogram"}
    histograms |= {n for n, (kind, *_) in RAY_SERVE_METRICS.items() if kind == "histogram"}
    for expr in exprs(dashboard):  # histograms are read through their buckets
        for name in metric_names(expr):
            if name in histograms:
                pytest.fail(f"histogram {name} queried without _bucket/_count/_sum: {expr}")
        if "histogram_quantile" in expr:
            assert re.search(r"by \(le\b|by \([^)]*\ble\b", expr), expr


def test_only_known_metric_names(dashboard):
    known = {**our_metrics(), **{n: kind for n, (kind, *_) in RAY_SERVE_METRICS.items()}}
    for expr in exprs(dashboard):
        for name in metric_names(expr):
            assert base_name(name, known) in known, f"unknown metric {name} in {expr}"


def test_ray_serve_metric_names_exist_in_ray_source():
    ray = pytest.importorskip("ray")
    private = Path(ray.__file__).parent / "serve" / "_private"
    for exported, (_, file, literal) in RAY_SERVE_METRICS.items():
        assert literal in (private / file).read_text(), f"{exported}: {literal} not in {file}"
        name = literal.strip('f"').replace("{protocol_name}", "http")
        assert exported in ("ray_" + name, "ray_" + name + "_total"), exported


def test_k8s_readme_describes_the_dashboard():
    assert "grafana-dashboard.json" in (ROOT / "k8s" / "README.md").read_text()
