"""The images the chart references: built from docker/, non-root with the ids the chart expects.
(No Docker daemon here: these read the Dockerfiles; the build itself runs in CI/release.)"""

from __future__ import annotations

import re

import pytest
import yaml

from chart_helpers import CHART_DIR, FULLNAME, REPO, pod, pods, render

DOCKER = REPO / "docker"
VALUES = yaml.safe_load((CHART_DIR / "values.yaml").read_text())


def instructions(name: str) -> list[tuple[str, str]]:
    text = (DOCKER / name).read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def final_stage(name: str) -> list[tuple[str, str]]:
    ins = instructions(name)
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last_from:]


@pytest.mark.parametrize("name", ["control-plane.Dockerfile", "ray-worker.Dockerfile"])
def test_multi_stage_and_non_root(name):
    ins = instructions(name)
    assert sum(op == "FROM" for op, _ in ins) >= 2, "multi-stage build expected"
    users = [arg for op, arg in final_stage(name) if op == "USER"]
    assert users, f"{name}: the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name}: numeric non-root USER expected (runAsNonRoot), got {uid}"
    assert (DOCKER / f"{name}.dockerignore").exists()


def test_control_plane_image_matches_the_chart():
    final = final_stage("control-plane.Dockerfile")
    uid, gid = (int(x) for x in [a for op, a in final if op == "USER"][-1].split(":"))
    sc = VALUES["global"]["podSecurityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"]) == (uid, gid)
    # Migrations run `alembic upgrade head` in the WORKDIR: alembic.ini and migrations/ are there.
    assert ("WORKDIR", "/app") in final
    assert ("COPY", "alembic.ini ./") in final and ("COPY", "migrations ./migrations") in final
    text = (DOCKER / "control-plane.Dockerfile").read_text()
    assert "download.pytorch.org/whl/cpu" in text, "the control plane must not pull CUDA torch"
    assert "nvidia" not in text.lower() and "cuda" not in final_stage("control-plane.Dockerfile")[0][1].lower()
    # The API's command matches the image's default command.
    api = pod(render(), f"Deployment/{FULLNAME}-api").spec["containers"][0]["command"]
    cmd = [a for op, a in final if op == "CMD"][-1]
    assert all(part in cmd for part in api[:3])


def test_ray_image_matches_the_chart():
    ins = instructions("ray-worker.Dockerfile")
    args = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    assert args["RAY_VERSION"] == VALUES["ray"]["rayVersion"], "image Ray must equal the RayCluster's rayVersion"
    assert final_stage("ray-worker.Dockerfile")[0][1].startswith("rayproject/ray:${RAY_VERSION}")
    assert "cu" in args["CUDA_TAG"]
    run = " ".join(a for op, a in ins if op == "RUN")
    assert "bitsandbytes" in run and "torch" in run
    ray_pod = next(p for p in pods(render()) if p.ray)
    uid, gid = (int(x) for x in [a for op, a in final_stage("ray-worker.Dockerfile") if op == "USER"][-1].split(":"))
    assert (ray_pod.spec["securityContext"]["runAsUser"], ray_pod.spec["securityContext"]["runAsGroup"]) == (uid, gid)


def test_chart_references_these_images():
    g = VALUES["global"]["image"]
    assert g["controlPlaneRepository"] == "lorafleet/control-plane"
    assert g["rayRepository"] == "lorafleet/ray-worker"
    for name, repo in (("control-plane.Dockerfile", g["controlPlaneRepository"]), ("ray-worker.Dockerfile", g["rayRepository"])):
        assert f"-t {repo}:" in (DOCKER / name).read_text()
