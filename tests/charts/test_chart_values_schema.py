"""values.schema.json (and the template checks it cannot express) refuse bad values at install,
naming the offending value."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from chart_helpers import CHART_DIR, chart, values_error

SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())

BAD = {
    "unknown top-level key": ({"replica": 3}, "additional properties 'replica' not allowed"),
    "unknown nested key (typo)": ({"api": {"replica": 3}}, "additional properties 'replica' not allowed"),
    "negative replicas": ({"api": {"replicas": -1}}, "/api/replicas"),
    "negative scheduler replicas": ({"scheduler": {"replicas": -2}}, "/scheduler/replicas"),
    "replicas as a string": ({"api": {"replicas": "two"}}, "/api/replicas"),
    "no database secret or url": ({"database": {"existingSecret": "", "url": ""}}, "/database"),
    "database url not postgres": ({"database": {"existingSecret": "", "url": "mysql://x/y"}}, "/database/url"),
    "object store not s3": ({"objectStore": {"url": "gs://bucket"}}, "/objectStore/url"),
    "endpoint without scheme": ({"objectStore": {"endpointUrl": "minio:9000"}}, "/objectStore/endpointUrl"),
    "gpus negative": ({"ray": {"workerGroups": [{"name": "g", "minReplicas": 0, "maxReplicas": 1, "gpus": -1}]}}, "/ray/workerGroups/0/gpus"),
    "worker group without max": ({"serve": {"workerGroups": [{"name": "g", "minReplicas": 0}]}}, "maxReplicas"),
    "worker group bad name": ({"ray": {"workerGroups": [{"name": "GPU_1", "minReplicas": 0, "maxReplicas": 1}]}}, "/ray/workerGroups/0/name"),
    "rayStartParams not strings": ({"ray": {"head": {"rayStartParams": {"num-cpus": 0}}}}, "/ray/head/rayStartParams/num-cpus"),
    "tenant rpm zero": ({"tenantDefaults": {"requestsPerMinute": 0}}, "/tenantDefaults/requestsPerMinute"),
    "wrong pull policy": ({"global": {"image": {"pullPolicy": "Sometimes"}}}, "/global/image/pullPolicy"),
    "ray version not semver": ({"ray": {"rayVersion": "latest"}}, "/ray/rayVersion"),
    "extraEnv without name": ({"extraEnv": [{"value": "x"}]}, "/extraEnv/0"),
    "serve import path": ({"serve": {"importPath": "workers/serve.py"}}, "/serve/importPath"),
    "adapter memory over 0.9 of the GPU": ({"serve": {"adapterMemoryFraction": 1.5}}, "/serve/adapterMemoryFraction"),
    "adapter memory as a slot count": ({"serve": {"deviceCacheAdapters": 64}}, "deviceCacheAdapters"),
    "empty catalog": ({"baseModels": {"catalog": []}}, "/baseModels/catalog"),
}

# What JSON schema cannot say, the templates check with `fail`.
BAD_IN_TEMPLATES = {
    "served model not in catalog": ({"serve": {"baseModel": "nope"}}, '"nope" is not in baseModels.catalog'),
    "min above max (worker group)": (
        {"ray": {"workerGroups": [{"name": "g", "minReplicas": 3, "maxReplicas": 1}]}},
        'worker group "g": minReplicas must not exceed maxReplicas',
    ),
    "min above max (serve)": ({"serve": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}, "serve.autoscaling.minReplicas"),
    "min above max (api hpa)": (
        {"api": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
        "api.autoscaling.minReplicas",
    ),
    "access key without secret": ({"objectStore": {"accessKeyId": "AK"}}, "objectStore.secretAccessKey is required"),
}


@pytest.mark.parametrize("values,message", BAD.values(), ids=BAD.keys())
def test_schema_rejects(values, message):
    err = values_error(values)
    assert "schema" in err and message in err, err


@pytest.mark.parametrize("values,message", BAD_IN_TEMPLATES.values(), ids=BAD_IN_TEMPLATES.keys())
def test_templates_reject(values, message):
    assert message in values_error(values)


def test_schema_is_draft7_and_accepts_the_defaults():
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    jsonschema.Draft7Validator(SCHEMA).validate(defaults)
    chart().validate_schema(defaults)


def test_every_default_value_is_documented_in_the_readme():
    readme = (CHART_DIR / "README.md").read_text()
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())

    opaque = {"resources", "livenessProbe", "readinessProbe", "podSecurityContext", "containerSecurityContext"}

    def leaves(node, prefix=""):
        if isinstance(node, dict) and node and prefix.rpartition(".")[2] not in opaque:
            for k, v in node.items():
                yield from leaves(v, f"{prefix}.{k}" if prefix else k)
        else:
            yield prefix

    missing = [k for k in leaves(defaults) if f"`{k}`" not in readme]
    assert not missing, f"values not documented in charts/lorafleet/README.md: {missing}"
