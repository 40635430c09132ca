"""The chart renders with Helm's engine, lints clean, and every object is valid for the API server:
Kubernetes' own schemas (strict: unknown fields are errors) and KubeRay's CRD schemas."""

from __future__ import annotations

import pytest
import helm_python as helm
import kubernetes_validate

from chart_helpers import CHART_DIR, CRD_DIR, EXAMPLES, crd_validator, example_values, render

# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest the validator knows.
K8S_VERSIONS = ["1.27", kubernetes_validate.utils.latest_version()]
VALUE_SETS = {"defaults": {}} | {p.stem: example_values(p) for p in EXAMPLES}
KUBERAY_KINDS = {"RayCluster", "RayService"}


def test_examples_exist():
    assert {"minio", "aws", "gpu-a100"} <= set(VALUE_SETS)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_renders_the_expected_objects(name):
    kinds = sorted(o["kind"] for o in render(VALUE_SETS[name]))
    for kind in ("Deployment", "Service", "Job", "RayCluster", "RayService"):
        assert kind in kinds, f"{name}: no {kind} in {kinds}"
    assert kinds.count("Deployment") == 2  # api and scheduler


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_finds_no_errors(name):
    report = helm.lint(CHART_DIR, VALUE_SETS[name], strict=True, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_helm_lint_reports_bad_values():
    """The lint check above can fail: a broken value set is an error."""
    report = helm.lint(CHART_DIR, {"api": {"replicas": "two"}})
    assert any(m["severity"] == 3 for m in report["messages"]), report


@pytest.mark.parametrize("name", VALUE_SETS)
def test_kubernetes_objects_validate_strict(name):
    checked = 0
    for obj in render(VALUE_SETS[name]):
        if obj["kind"] in KUBERAY_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} (k8s {version}) at {path}: {exc.message}")
        checked += 1
    assert checked >= 6


def test_kubernetes_validation_catches_unknown_fields():
    obj = next(o for o in render() if o["kind"] == "Deployment")
    obj["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)


requires_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(),
    reason=f"!!! KubeRay CRD schemas not found at {CRD_DIR}: RayCluster/RayService NOT validated !!!",
)


@requires_crds
@pytest.mark.parametrize("name", VALUE_SETS)
def test_kuberay_objects_validate_against_crds(name):
    ray_objs = [o for o in render(VALUE_SETS[name]) if o["kind"] in KUBERAY_KINDS]
    assert {o["kind"] for o in ray_objs} == KUBERAY_KINDS
    for obj in ray_objs:
        assert obj["apiVersion"] == "ray.io/v1"
        errors = sorted(crd_validator(obj["kind"]).iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, "\n".join(
            f"{name}: {obj['kind']} at {'.'.join(map(str, e.path))}: {e.message}" for e in errors[:10]
        )


@requires_crds
def test_crd_validation_catches_mistakes():
    cluster = next(o for o in render() if o["kind"] == "RayCluster")
    typo = {**cluster, "spec": {**cluster["spec"], "enableInTreeAutoScaling": True}}
    assert list(crd_validator("RayCluster").iter_errors(typo))
    bad_mode = {**cluster, "spec": {**cluster["spec"], "authOptions": {"mode": "password"}}}
    assert list(crd_validator("RayCluster").iter_errors(bad_mode))
