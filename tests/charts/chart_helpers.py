"""Rendering charts/lorafleet with Helm's own engine (helm-python-sdk) and walking the result."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "lorafleet"
EXAMPLES = sorted((CHART_DIR / "examples").glob("*.yaml"))
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
RELEASE, NAMESPACE = "lf", "ai"
FULLNAME = f"{RELEASE}-lorafleet"

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


@functools.cache
def _render(values_json: str) -> tuple[dict, ...]:
    manifests = chart().render(
        json.loads(values_json), name=RELEASE, namespace=NAMESPACE, is_install=True
    )
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.load_all(text, Loader=_LOADER):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                docs.append(doc)
    return tuple(docs)


def render(values: dict | None = None) -> list[dict]:
    """Every object the chart renders for ``values`` (deep copies: tests may mutate them)."""
    return copy.deepcopy(list(_render(json.dumps(values or {}, sort_keys=True))))


def notes(values: dict | None = None) -> str:
    out = chart().render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def example_values(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


@dataclass
class Pod:
    """One pod template of the release: where it comes from and whether it is a Ray pod."""

    owner: str
    spec: dict
    ray: bool

    def containers(self) -> list[dict]:
        return self.spec.get("initContainers", []) + self.spec["containers"]

    def env(self, container: str | None = None) -> dict[str, dict]:
        merged: dict[str, dict] = {}
        for c in self.containers():
            if container is None or c["name"] == container:
                for e in c.get("env", []):
                    merged[e["name"]] = e
        return merged

    def secret_refs(self) -> set[tuple[str, str | None]]:
        """(secret, key) pairs this pod can read: env, envFrom and volumes."""
        refs: set[tuple[str, str | None]] = set()
        for c in self.containers():
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    refs.add((src["secretRef"]["name"], None))
        for v in self.spec.get("volumes", []):
            if "secret" in v:
                refs.add((v["secret"]["secretName"], None))
        return refs


def ray_cluster_specs(objs: list[dict]) -> Iterator[tuple[str, dict]]:
    for o in objs:
        if o["kind"] == "RayCluster":
            yield f"RayCluster/{o['metadata']['name']}", o["spec"]
        elif o["kind"] == "RayService":
            yield f"RayService/{o['metadata']['name']}", o["spec"]["rayClusterConfig"]


def pods(objs: list[dict]) -> list[Pod]:
    found = []
    for o in objs:
        if o["kind"] in ("Deployment", "Job"):
            found.append(Pod(f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"], False))
    for owner, spec in ray_cluster_specs(objs):
        found.append(Pod(f"{owner}/head", spec["headGroupSpec"]["template"]["spec"], True))
        for g in spec.get("workerGroupSpecs", []):
            found.append(Pod(f"{owner}/{g['groupName']}", g["template"]["spec"], True))
    return found


def pod(objs: list[dict], owner: str) -> Pod:
    return next(p for p in pods(objs) if p.owner == owner)


def values_error(values: dict) -> str:
    """The message Helm gives when it refuses ``values`` (schema or template ``fail``)."""
    try:
        chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    except (helm.HelmValuesError, helm.HelmRenderError) as exc:
        return str(exc)
    raise AssertionError(f"the chart accepted {values}")


def strict_crd_schema(schema: Any) -> Any:
    """The CRD schema as the API server applies it: fields it does not declare are not kept.

    jsonschema would accept them silently; the API server prunes them (a typo'd field simply
    disappears). Closing every declared object makes such a typo a test failure instead.
    """
    if isinstance(schema, list):
        return [strict_crd_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_crd_schema(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str, version: str = "v1"):
    import jsonschema

    path = CRD_DIR / f"ray.io_{kind.lower()}s.yaml"
    crd = yaml.load(path.read_text(), Loader=_LOADER)
    schema = next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)
    schema = strict_crd_schema(schema)
    # The generic object metadata is not in the CRD schema; the API server checks it.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)
