"""Alert rules and the Grafana dashboard against the metric contract; the Prometheus rules
(promtool) and the in-process evaluator driven by the same series must agree."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from freshcache.observability import (
    CACHE_REQUESTS,
    CONTRACT,
    DEFAULT_RULES,
    ENDPOINT_GROUP_PATTERN,
    INVALIDATIONS,
    REALTIME_CONNECTS,
    REALTIME_DISCONNECTS,
    Alert,
    AlertEvaluator,
    AlertRule,
    CacheResult,
    DisconnectReason,
    MetricKind,
    Transport,
    series,
)
from freshcache.observability.series import SeriesKey, extrapolated_increase

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "freshcache-dashboard.json"
RULES_BY_NAME: dict[str, AlertRule] = {rule.name: rule for rule in DEFAULT_RULES}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found; install it with: apt-get install -y prometheus")
    return path


def run_promtool(*arguments: str) -> None:
    result = subprocess.run(
        [promtool(), *arguments], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def seconds(duration: str) -> float:
    """A Prometheus duration of one unit (``90s``, ``5m``, ``1h``) in seconds."""
    match = re.fullmatch(r"(\d+)([smh])", duration)
    assert match, f"unsupported duration {duration!r}"
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]


# -- the rules file's test series, read for the in-process evaluator --------------------


def expand_values(text: str) -> list[float | None]:
    """promtool's series values: numbers, ``_`` (no sample), ``_xn`` (n without) and
    ``a+bxn`` / ``a-bxn`` (n + 1 samples from a, by b)."""
    values: list[float | None] = []
    for token in text.split():
        expanding = re.fullmatch(r"(-?[\d.]+)([+-])([\d.]+)x(\d+)", token)
        if expanding:
            start, sign, step, count = expanding.groups()
            signed = float(step) if sign == "+" else -float(step)
            values += [float(start) + signed * index for index in range(int(count) + 1)]
        elif token == "_":
            values.append(None)
        elif missing := re.fullmatch(r"_x(\d+)", token):
            values += [None] * int(missing.group(1))
        else:
            values.append(float(token))
    return values


def parse_series(selector: str) -> SeriesKey:
    match = re.fullmatch(r"([a-zA-Z_:][\w:]*)\{(.*)\}", selector)
    assert match, f"unsupported series {selector!r}"
    labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
    return series(match.group(1), **labels)


@dataclass
class RuleTestGroup:
    """One test group of alerts_test.yml: its series and its expectations."""

    source: dict[str, Any]
    interval: float
    values: dict[SeriesKey, list[float | None]]
    # (eval time in seconds, alert name) -> the expected alerts' label sets
    expected: dict[tuple[float, str], set[frozenset[tuple[str, str]]]]

    @property
    def steps(self) -> int:
        return max(len(values) for values in self.values.values())

    def samples(self, step: int) -> dict[SeriesKey, float]:
        return {
            key: value
            for key, values in self.values.items()
            if step < len(values) and (value := values[step]) is not None
        }


def rule_test_groups() -> list[RuleTestGroup]:
    document = yaml.safe_load(RULE_TESTS.read_text())
    assert seconds(document["evaluation_interval"]) == 60
    groups = []
    for source in document["tests"]:
        expected = {
            (seconds(case["eval_time"]), case["alertname"]): {
                frozenset(alert["exp_labels"].items()) for alert in case["exp_alerts"]
            }
            for case in source["alert_rule_test"]
        }
        groups.append(
            RuleTestGroup(
                source,
                seconds(source["interval"]),
                {
                    parse_series(item["series"]): expand_values(item["values"])
                    for item in source["input_series"]
                },
                expected,
            )
        )
    return groups


def evaluate_minute_by_minute(group: RuleTestGroup) -> Iterator[tuple[float, tuple[Alert, ...]]]:
    """Feed the group's series to a new evaluator, one evaluation per sample interval
    (as promtool evaluates the rule group)."""
    assert group.interval == 60, "the rules are evaluated every minute"
    evaluator = AlertEvaluator()
    for step in range(group.steps):
        timestamp = step * group.interval
        yield timestamp, evaluator.observe(timestamp, group.samples(step))


def alert_labels(alert: Alert) -> frozenset[tuple[str, str]]:
    return frozenset({"severity": alert.severity, **alert.labels}.items())


def rules_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return document


def rule_definitions() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in rules_document()["groups"] for rule in group["rules"]}


def render_annotations(templates: Mapping[str, str], labels: Mapping[str, str]) -> dict[str, str]:
    """The rule's annotations for an alert with ``labels`` (they only use ``$labels``)."""
    rendered = {}
    for name, template in templates.items():
        text = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m.group(1)], template)
        assert "{{" not in text, f"annotation {name} uses more than $labels"
        rendered[name] = text
    return rendered


# -- promtool -----------------------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    run_promtool("check", "rules", str(RULES))


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    run_promtool("test", "rules", str(RULE_TESTS))


# -- the evaluator and promtool on the same series ------------------------------------


def test_the_evaluator_meets_the_expectations_of_the_rule_tests() -> None:
    checked = 0
    for group in rule_test_groups():
        timeline = dict(evaluate_minute_by_minute(group))
        for (eval_time, name), expected in group.expected.items():
            got = {alert_labels(alert) for alert in timeline[eval_time] if alert.name == name}
            assert got == expected, f"{name} at {eval_time:g} s"
            checked += 1
    assert checked >= 10


def test_promtool_and_the_evaluator_fire_the_same_alerts_at_every_minute(
    tmp_path: Path,
) -> None:
    """One definition of the series (alerts_test.yml) feeds the evaluator; its verdict at
    every minute becomes a promtool test over the same series, which promtool must pass."""
    definitions = rule_definitions()
    fired: set[str] = set()
    quiet: set[str] = set()
    tests = []
    for group in rule_test_groups():
        cases = []
        for timestamp, alerts in evaluate_minute_by_minute(group):
            for name in RULES_BY_NAME:
                firing = [alert for alert in alerts if alert.name == name]
                (fired if firing else quiet).add(name)
                cases.append(
                    {
                        "eval_time": f"{timestamp:.0f}s",
                        "alertname": name,
                        "exp_alerts": [
                            {
                                "exp_labels": dict(alert_labels(alert)),
                                "exp_annotations": render_annotations(
                                    definitions[name]["annotations"], alert.labels
                                ),
                            }
                            for alert in firing
                        ],
                    }
                )
        tests.append(
            {
                "interval": group.source["interval"],
                "input_series": group.source["input_series"],
                "alert_rule_test": cases,
            }
        )
    # Not a comparison of silences: each alert fires somewhere and is quiet elsewhere.
    assert fired == quiet == set(RULES_BY_NAME)
    generated = tmp_path / "every_minute_test.yml"
    generated.write_text(
        yaml.safe_dump(
            {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests},
            sort_keys=False,
        )
    )
    run_promtool("test", "rules", str(generated))


def test_an_alert_fires_once_its_condition_held_for_the_rule_duration() -> None:
    group = rule_test_groups()[0]  # the hit ratio's
    hold = RULES_BY_NAME["CacheHitRatioLow"].hold
    first_firing = next(
        (timestamp, alerts[0]) for timestamp, alerts in evaluate_minute_by_minute(group) if alerts
    )
    timestamp, alert = first_firing
    assert timestamp == alert.since + hold
    assert alert.labels == {"endpoint_group": "products"}
    assert alert.severity == "warning"
    assert 0.5 < alert.value < 0.7


# -- the rules file and the Python rules are one definition ---------------------------


def test_the_rules_file_and_the_python_rules_agree() -> None:
    definitions = rule_definitions()
    assert set(definitions) == set(RULES_BY_NAME)
    for name, rule in RULES_BY_NAME.items():
        definition = definitions[name]
        assert seconds(definition["for"]) == rule.hold
        assert definition["labels"] == {"severity": rule.severity}
        assert definition["annotations"].get("action") == rule.action
        assert f"[{rule.window / 60:.0f}m]" in definition["expr"]
    hit_ratio = definitions["CacheHitRatioLow"]["expr"]
    assert hit_ratio.count(f'"{ENDPOINT_GROUP_PATTERN}"') == 6
    assert "< 0.70" in hit_ratio and ">= 0.2" in hit_ratio
    assert "* 60 > 1000" in definitions["CacheInvalidationStorm"]["expr"]
    drops = definitions["RealtimeConnectionDrops"]["expr"]
    assert "> 0.10" in drops and ">= 5" in drops


def test_the_endpoint_groups_come_from_the_route_templates() -> None:
    pattern = re.compile(ENDPOINT_GROUP_PATTERN)

    def group(endpoint: str) -> str | None:
        match = pattern.fullmatch(endpoint)
        return match.group(1) if match else None

    assert group("/api/products") == "products"
    assert group("/api/products/{product_id}/stock") == "products"
    assert group("/api/users/{user_id}/profile") == "users"
    assert group("/api/categories") == "categories"
    assert group("/api/marketplace/categories") == "categories"
    assert group("/api/orders/{order_id}") is None
    assert group("/api/productsx") is None
    assert group("unmatched") is None


# -- the evaluator on a prometheus-client registry ------------------------------------


def test_the_evaluator_reads_a_registry_and_fires_after_the_hold() -> None:
    registry = CollectorRegistry()
    requests = CACHE_REQUESTS.counter(registry)
    connects = REALTIME_CONNECTS.counter(registry)
    disconnects = REALTIME_DISCONNECTS.counter(registry)
    evaluator = AlertEvaluator()
    profile = "/api/users/{user_id}/profile"
    hit_ratio = RULES_BY_NAME["CacheHitRatioLow"]
    firing_at: list[float] = []
    for minute in range(30):
        now = 1_700_000_000.0 + minute * 60
        # Half the profile reads miss from the start; connections are healthy.
        requests.labels(profile, CacheResult.HIT).inc(50)
        requests.labels(profile, CacheResult.MISS).inc(50)
        connects.labels(Transport.SSE).inc(100)
        disconnects.labels(Transport.SSE, DisconnectReason.CLIENT).inc(90)
        disconnects.labels(Transport.SSE, DisconnectReason.ERROR).inc(1)
        if evaluator.observe_registry(registry, now):
            firing_at.append(now)
    assert firing_at, "the hit ratio alert never fired"
    (alert,) = evaluator.firing
    assert alert.name == "CacheHitRatioLow" and alert.labels == {"endpoint_group": "users"}
    assert alert.value == pytest.approx(0.5)
    # Holding from the second scrape (the first rate needs two samples) for the hold.
    assert alert.since == 1_700_000_060.0
    assert firing_at[0] == alert.since + hit_ratio.hold


def test_an_alert_resolves_when_its_condition_stops() -> None:
    evaluator = AlertEvaluator()
    total = 0.0
    timeline = []
    for minute in range(20):
        total += 2000 if minute < 8 else 10
        timeline.append(bool(evaluator.observe(minute * 60.0, {series(INVALIDATIONS.name): total})))
    assert timeline[:2] == [False, False]
    first = timeline.index(True)
    assert timeline[first : first + 3] == [True] * 3
    assert timeline[-1] is False and evaluator.firing == ()


def test_samples_must_not_go_back_in_time() -> None:
    evaluator = AlertEvaluator()
    evaluator.observe(100.0, {series(INVALIDATIONS.name): 1.0})
    with pytest.raises(ValueError, match="before the last one"):
        evaluator.observe(99.0, {series(INVALIDATIONS.name): 2.0})


def test_increase_follows_prometheus_through_resets_and_window_edges() -> None:
    # Samples every 60 s filling the window: no extrapolation.
    assert extrapolated_increase([(0, 10), (60, 20), (120, 40)], 0, 120) == 30
    # A reset: the 40 counted before it are added back.
    assert extrapolated_increase([(0, 10), (60, 40), (120, 5)], 0, 120) == 35
    # Starting far from zero, extrapolated half a step past each edge of the samples.
    assert extrapolated_increase([(60, 100), (120, 160)], -200, 400) == 120
    # A counter is not extrapolated back past its zero point.
    assert extrapolated_increase([(60, 0), (120, 60)], 0, 120) == 60
    assert extrapolated_increase([(60, 5)], 0, 120) is None
    # Samples further than 1.1 steps from an edge: extrapolated half a step only.
    assert extrapolated_increase([(0, 100), (60, 160)], -600, 60) == 90


# -- the Grafana dashboard ------------------------------------------------------------

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "inf", "nan",
}  # fmt: skip
# Prometheus' own series of alert states, written by its rule evaluation.
PROMETHEUS_SERIES = {"ALERTS"}


def metric_names(expression: str) -> set[str]:
    """The series names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text
    )  # grouping labels
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][\w:]*", text):
        following = text[match.end() :].lstrip()
        if following.startswith("(") or match.group(0).lower() in PROMQL_WORDS:
            continue  # a function or aggregation, or a keyword
        names.add(match.group(0))
    return names


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_metric_names_finds_only_series() -> None:
    expression = (
        'histogram_quantile(0.99, sum by (le, cache) (rate(a_bucket{cache=~"hit|miss"}'
        "[$__rate_interval]))) / on (x) group_left b_total and ignoring (y) c * 1e3"
    )
    assert metric_names(expression) == {"a_bucket", "b_total", "c"}


def test_the_dashboard_queries_only_the_contract() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    contract = {name for spec in CONTRACT for name in spec.series_names}
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    used: set[str] = set()
    queried_panels = 0
    for panel in panels(dashboard):
        targets = panel.get("targets", [])
        if panel["type"] == "row":
            continue
        assert targets, f"panel {panel['title']!r} has no query"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        queried_panels += 1
        for target in targets:
            names = metric_names(target["expr"])
            assert names, f"{panel['title']!r}: no metric in {target['expr']!r}"
            unknown = names - contract - PROMETHEUS_SERIES
            assert not unknown, f"{panel['title']!r} queries {sorted(unknown)}"
            used |= names
    assert queried_panels >= 8
    # Every metric of the contract is on the dashboard.
    for spec in CONTRACT:
        assert used & set(spec.series_names), f"{spec.name} is on no panel"
    alerts_panel = [p for p in panels(dashboard) if "ALERTS" in str(p.get("targets"))]
    assert alerts_panel, "no panel shows the firing alerts"


def test_the_contract_creates_its_metrics_under_its_names() -> None:
    for spec in CONTRACT:
        registry = CollectorRegistry()
        parts = ["x"] * len(spec.labels)
        if spec.kind is MetricKind.COUNTER:
            counter = spec.counter(registry)
            (counter.labels(*parts) if parts else counter).inc()
        elif spec.kind is MetricKind.GAUGE:
            gauge = spec.gauge(registry)
            (gauge.labels(*parts) if parts else gauge).set(1)
        else:
            histogram = spec.histogram(registry)
            (histogram.labels(*parts) if parts else histogram).observe(0.01)
        exported = {sample.name for family in registry.collect() for sample in family.samples}
        assert exported - {spec.name.removesuffix("_total") + "_created"} == set(
            spec.series_names
        ), spec.name
    with pytest.raises(TypeError, match="is a gauge, not a counter"):
        CONTRACT[2].counter(CollectorRegistry())
