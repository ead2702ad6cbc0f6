"""Write prometheusrule.yaml from deploy/prometheus/rules/detector.rules.yml.

The Prometheus Operator wants the rule groups inside a PrometheusRule; the plain file is what
promtool checks and tests. tests/unit/test_deploy.py fails when the two differ. Run from
anywhere:  python deploy/kubernetes/render_prometheusrule.py
"""

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "prometheus" / "rules" / "detector.rules.yml"
OUT = HERE / "prometheusrule.yaml"
HEADER = """\
# Generated from deploy/prometheus/rules/detector.rules.yml by render_prometheusrule.py (a unit
# test checks they match): edit that file, not this one. Your Prometheus's ruleSelector may
# require an extra label.
"""


def render() -> str:
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "detector", "labels": {"app.kubernetes.io/name": "detector"}},
        "spec": yaml.safe_load(RULES.read_text()),
    }
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=120, allow_unicode=True)


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
