"""checkov on the default render and every ci/ scenario: no failed check; each skip states its reason
in the template (a `checkov.io/skipN: CHECK=reason` annotation).

checkov skips custom kinds, so each RayCluster group's pod template is re-emitted as a Deployment
(carrying the template's annotations) for it to see. One checkov run scans every scenario.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm import tools
from tests.helm.manifests import SCENARIO_NAMES, Manifest
from tests.helm.test_chart import as_deployments

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkov_results(render: Callable[..., list[Manifest]], tmp_path_factory: pytest.TempPathFactory
                    ) -> dict[str, dict[str, Any]]:
    """Scenario -> checkov's results (passed, failed and skipped checks) for its manifests."""
    folder = tmp_path_factory.mktemp("checkov")
    for scenario in SCENARIO_NAMES:
        manifests = as_deployments(render(scenario))
        (folder / f"{scenario}.yaml").write_text(yaml.safe_dump_all(manifests, sort_keys=False))
    # --skip-download: no call home (the cluster this chart is for has no internet, nor has CI).
    done = subprocess.run([str(tools.checkov()), "--directory", str(folder), "--framework", "kubernetes",
                           "--skip-download", "--output", "json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    report = json.loads(done.stdout)
    results = report["results"] if isinstance(report, dict) else report[0]["results"]
    by_scenario: dict[str, dict[str, Any]] = {s: {"passed": [], "failed": [], "skipped": []} for s in SCENARIO_NAMES}
    for outcome in ("passed", "failed", "skipped"):
        for check in results[f"{outcome}_checks"]:
            by_scenario[Path(check["file_path"]).stem][outcome].append(check)
    return by_scenario


def describe(check: dict[str, Any]) -> str:
    return f"{check['check_id']} {check['check_name']} on {check['resource']}"


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_checkov_fails_no_check_when_scenario_is_given(checkov_results: dict[str, dict[str, Any]],
                                                       scenario: str) -> None:
    results = checkov_results[scenario]
    assert [describe(c) for c in results["failed"]] == []
    assert len(results["passed"]) > 100, "checkov saw too little: did the re-emitted pods reach it?"
    # The RayCluster's pods were scanned as well (head and every worker group).
    scanned = {c["resource"] for c in results["passed"]}
    assert any(r.endswith("-head") for r in scanned), scanned


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_checkov_skips_only_with_a_reason_stated_in_the_template_when_scenario_is_given(
        checkov_results: dict[str, dict[str, Any]], scenario: str) -> None:
    for check in checkov_results[scenario]["skipped"]:
        reason = check["check_result"].get("suppress_comment", "")
        assert len(reason) > 40, f"{describe(check)} is skipped without a stated reason: {reason!r}"
    # Pinned by digest, the images leave no skip for CKV_K8S_43 behind.
    if scenario == "private-registry-digests":
        assert all(c["check_id"] != "CKV_K8S_43" for c in checkov_results[scenario]["skipped"])


def test_checkov_fails_no_dockerfile_check_when_the_image_recipe_is_scanned() -> None:
    dockerfile = tools.REPO / "helm" / "image" / "Dockerfile"
    done = subprocess.run([str(tools.checkov()), "--file", str(dockerfile), "--framework", "dockerfile",
                           "--skip-download", "--output", "json"], capture_output=True, text=True, timeout=300)
    report = json.loads(done.stdout)
    results = (report if isinstance(report, dict) else report[0])["results"]
    assert [describe(c) for c in results["failed_checks"]] == []
    for check in results["skipped_checks"]:
        assert len(check["check_result"].get("suppress_comment", "")) > 40, describe(check)
