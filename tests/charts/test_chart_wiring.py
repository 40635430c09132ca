"""What reaches which pod: secrets, hooks, probes, GPUs, Ray auth and the Serve config."""

from __future__ import annotations

import base64

import pytest
import yaml

from chart_helpers import EXAMPLES, FULLNAME, NAMESPACE, example_values, one, pod, pods, ray_cluster_specs, render

API, SCHEDULER, MIGRATIONS = (f"Deployment/{FULLNAME}-api", f"Deployment/{FULLNAME}-scheduler", f"Job/{FULLNAME}-migrations")
DB_URL = "postgresql+psycopg://u:p@pg:5432/lf"
MINIO = {
    "database": {"url": DB_URL},
    "objectStore": {"url": "s3://bucket/pre", "endpointUrl": "http://minio:9000", "accessKeyId": "AK", "secretAccessKey": "SK"},
}
ALL_SETS = [{}, MINIO] + [example_values(p) for p in EXAMPLES]
SET_IDS = ["defaults", "minio-inline"] + [p.stem for p in EXAMPLES]
FORBIDDEN_IN_RAY = {"LORAFLEET_DATABASE_URL", "LORAFLEET_ADMIN_TOKEN", "LORAFLEET_INTERNAL_SECRET"}


def secret(objs, name):
    s = one(objs, "Secret", name)
    return {k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()} | s.get("stringData", {})


# -- secrets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("values", ALL_SETS, ids=SET_IDS)
def test_database_secret_reaches_control_plane_and_no_ray_pod(values):
    objs = render(values)
    db = values.get("database", {})
    expected = (f"{FULLNAME}-database", "url") if db.get("url") else (db.get("existingSecret", "lorafleet-database"), db.get("existingSecretKey", "url"))
    for owner in (API, SCHEDULER, MIGRATIONS):
        p = pod(objs, owner)
        main = p.spec["containers"][0]["name"]
        ref = p.env(main)["LORAFLEET_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == expected, owner
    # The API and scheduler wait for migrations with the same credentials.
    for owner in (API, SCHEDULER):
        assert "LORAFLEET_DATABASE_URL" in pod(objs, owner).env("wait-for-migrations")
    ray_pods = [p for p in pods(objs) if p.ray]
    assert len(ray_pods) >= 4
    for p in ray_pods:
        assert expected[0] not in {name for name, _ in p.secret_refs()}, p.owner
        assert not FORBIDDEN_IN_RAY & set(p.env()), p.owner
        assert not any("DATABASE" in name or "POSTGRES" in name for name in p.env()), p.owner


@pytest.mark.parametrize("values", ALL_SETS, ids=SET_IDS)
def test_ray_pods_read_only_the_object_store_secret(values):
    objs = render(values)
    store = values.get("objectStore", {})
    store_secret = store.get("existingSecret") or f"{FULLNAME}-object-store"
    has_creds = bool(store.get("existingSecret") or store.get("accessKeyId"))
    for p in (p for p in pods(objs) if p.ray):
        env = p.env()
        assert env["LORAFLEET_OBJECT_STORE_URL"]["value"] == store.get("url", "s3://lorafleet/prod")
        # Serving pods also check the API's signatures (tests/charts/test_chart_networkpolicy.py).
        signing_secret = values.get("serve", {}).get("signing", {}).get("existingSecret") or f"{FULLNAME}-serve-signing"
        signing = {signing_secret} if p.owner.startswith("RayService/") else set()
        assert {name for name, _ in p.secret_refs()} <= {store_secret} | signing, p.owner
        if has_creds:
            assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == store_secret
            assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == store_secret
        else:
            assert "AWS_ACCESS_KEY_ID" not in env  # e.g. an instance role
        if store.get("endpointUrl"):
            assert env["AWS_ENDPOINT_URL"]["value"] == store["endpointUrl"]


def test_inline_credentials_become_a_secret_used_by_api_and_ray():
    objs = render(MINIO)
    assert secret(objs, f"{FULLNAME}-object-store") == {"access-key-id": "AK", "secret-access-key": "SK"}
    assert secret(objs, f"{FULLNAME}-database") == {"url": DB_URL}
    for owner in (API, SCHEDULER):
        env = pod(objs, owner).env()
        assert env["LORAFLEET_S3_ENDPOINT_URL"]["value"] == "http://minio:9000"
    api, scheduler = pod(objs, API).env(), pod(objs, SCHEDULER).env()
    assert api["LORAFLEET_S3_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == f"{FULLNAME}-object-store"
    # The scheduler names the store in each run's spec but never reads it: no credentials.
    assert "LORAFLEET_S3_ACCESS_KEY_ID" not in scheduler and "LORAFLEET_S3_SECRET_ACCESS_KEY" not in scheduler
    # Credentials never appear in clear in any pod spec.
    for p in pods(objs):
        assert all(e.get("value") not in ("AK", "SK", DB_URL) for e in p.env().values()), p.owner
    # The migrations Job needs nothing but the database.
    assert {name for name, _ in pod(objs, MIGRATIONS).secret_refs()} == {f"{FULLNAME}-database"}


def test_admin_token_only_in_api_and_internal_secret_only_in_api_and_scheduler():
    objs = render(MINIO)
    holders = {p.owner for p in pods(objs) if "LORAFLEET_ADMIN_TOKEN" in p.env()}
    assert holders == {API}
    holders = {p.owner for p in pods(objs) if "LORAFLEET_INTERNAL_SECRET" in p.env()}
    assert holders == {API, SCHEDULER}
    auth = secret(objs, f"{FULLNAME}-auth")
    assert len(auth["admin-token"]) == 40 and len(auth["internal-secret"]) == 48
    assert pod(objs, API).env()["LORAFLEET_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-auth", "key": "admin-token"}


def test_given_tokens_are_used_and_existing_secrets_are_not_recreated():
    objs = render({"auth": {"adminToken": "adm", "internalSecret": "int"}, "ray": {"auth": {"token": "rt"}}})
    assert secret(objs, f"{FULLNAME}-auth") == {"admin-token": "adm", "internal-secret": "int"}
    assert secret(objs, f"{FULLNAME}-ray-token") == {"auth_token": "rt"}
    objs = render(example_values(next(p for p in EXAMPLES if p.stem == "aws")))
    assert [o for o in objs if o["kind"] == "Secret"] == []


# -- Ray token authentication --------------------------------------------------------------------


@pytest.mark.parametrize("values", ALL_SETS, ids=SET_IDS)
def test_ray_token_auth_is_on_and_shared_with_the_ray_clients_only(values):
    objs = render(values)
    token_secret = values.get("ray", {}).get("auth", {}).get("existingSecret") or f"{FULLNAME}-ray-token"
    specs = dict(ray_cluster_specs(objs))
    assert len(specs) == 2
    for owner, spec in specs.items():
        assert spec["authOptions"] == {"mode": "token", "secretName": token_secret}, owner
    env = pod(objs, SCHEDULER).env()  # the one client of Ray: the API only proxies to Serve's HTTP
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": token_secret, "key": "auth_token"}
    for owner in (API, MIGRATIONS):
        assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_MODE"} & pod(objs, owner).env().keys(), owner
        assert token_secret not in {name for name, _ in pod(objs, owner).secret_refs()}, owner


def test_control_plane_finds_ray_and_serve_through_kuberay_services():
    objs = render()
    env = pod(objs, SCHEDULER).env()
    cluster = one(objs, "RayCluster")["metadata"]["name"]
    service = one(objs, "RayService")["metadata"]["name"]
    assert env["LORAFLEET_RAY_ADDRESS"]["value"] == f"http://{cluster}-head-svc.{NAMESPACE}.svc:8265"
    assert pod(objs, API).env()["LORAFLEET_SERVE_URL"]["value"] == f"http://{service}-serve-svc.{NAMESPACE}.svc:8000"
    api_url = f"http://{FULLNAME}-api.{NAMESPACE}.svc:8000"
    assert env["LORAFLEET_PUBLIC_URL"]["value"] == api_url
    # Training workers report to the API's internal routes.
    assert pod(objs, f"RayCluster/{cluster}/gpu").env()["LORAFLEET_PUBLIC_URL"]["value"] == api_url


def test_control_plane_env_names_are_settings_the_service_reads():
    settings = pytest.importorskip("service.settings")
    known = {f"LORAFLEET_{f.upper()}" for f in settings.Settings.model_fields}
    known |= {f"LORAFLEET_TENANT_{f.upper()}" for f in settings.TenantDefaults.model_fields}
    objs = render(MINIO)
    for owner in (API, SCHEDULER, MIGRATIONS):
        names = {n for n in pod(objs, owner).env() if n.startswith("LORAFLEET_")}
        assert names and names <= known, f"{owner}: unknown settings {names - known}"


# -- migrations hook and ordering ----------------------------------------------------------------


def test_migrations_job_is_a_pre_install_and_pre_upgrade_hook_after_its_secret():
    objs = render(MINIO)
    job = one(objs, "Job")
    ann = job["metadata"]["annotations"]
    assert set(ann["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "before-hook-creation" in ann["helm.sh/hook-delete-policy"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["alembic", "upgrade", "head"]
    # The chart-made database Secret must exist before the hook Job runs at pre-install.
    db = one(objs, "Secret", f"{FULLNAME}-database")["metadata"]["annotations"]
    assert set(db["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert int(db["helm.sh/hook-weight"]) < int(ann["helm.sh/hook-weight"])
    # Nothing else is a hook: the Deployments come after the Job has succeeded.
    hooks = {o["metadata"]["name"] for o in objs if "helm.sh/hook" in o["metadata"]["annotations"]}
    assert hooks == {job["metadata"]["name"], f"{FULLNAME}-database"}


def test_api_and_scheduler_wait_for_the_migrations():
    objs = render()
    for owner in (API, SCHEDULER):
        init = pod(objs, owner).spec["initContainers"]
        assert [c["name"] for c in init] == ["wait-for-migrations"]
        assert "alembic current" in init[0]["command"][-1] and "(head)" in init[0]["command"][-1]
    objs = render({"migrations": {"waitInitContainer": False}})
    assert "initContainers" not in pod(objs, API).spec and "initContainers" not in pod(objs, SCHEDULER).spec


# -- API: probes, security, scaling --------------------------------------------------------------


def test_api_probes_command_and_port():
    objs = render()
    c = pod(objs, API).spec["containers"][0]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["command"][:3] == ["uvicorn", "service.main:create_app", "--factory"]
    svc = one(objs, "Service", f"{FULLNAME}-api")
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert svc["spec"]["selector"] == one(objs, "Deployment", f"{FULLNAME}-api")["spec"]["selector"]["matchLabels"]
    assert pod(objs, SCHEDULER).spec["containers"][0]["command"] == ["python", "-m", "service.scheduler"]
    # Replicas never migrate on start-up: the hook Job does, once.
    assert pod(objs, API).env()["LORAFLEET_AUTO_MIGRATE"]["value"] == "false"
    # Ray runs the entrypoint with its own interpreter, not the scheduler image's path.
    assert pod(objs, SCHEDULER).env()["LORAFLEET_TRAIN_ENTRYPOINT"]["value"] == "python -m workers.train.ray_job"
    assert "LORAFLEET_MAX_RUNNING_JOBS" not in pod(objs, SCHEDULER).env()
    assert pod(render({"scheduler": {"maxRunningJobs": 3}}), SCHEDULER).env()["LORAFLEET_MAX_RUNNING_JOBS"]["value"] == "3"


def test_control_plane_runs_non_root_on_a_read_only_root_filesystem():
    objs = render()
    for p in (p for p in pods(objs) if not p.ray):
        assert p.spec["securityContext"]["runAsNonRoot"] is True, p.owner
        assert p.spec["automountServiceAccountToken"] is False
        assert any(v["name"] == "tmp" and "emptyDir" in v for v in p.spec["volumes"]), p.owner
        for c in p.containers():
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, (p.owner, c["name"])
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
            assert c["resources"]["requests"] and c["resources"]["limits"]
    for p in (p for p in pods(objs) if p.ray):
        assert p.spec["securityContext"]["runAsNonRoot"] is True, p.owner


def test_hpa_replaces_fixed_replicas_and_pdb_and_ingress_follow_values():
    objs = render({"api": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 9}, "ingress": {"enabled": True, "host": "x.example"}}})
    assert "replicas" not in one(objs, "Deployment", f"{FULLNAME}-api")["spec"]
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 9)
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{FULLNAME}-api"
    assert one(objs, "Ingress")["spec"]["rules"][0]["host"] == "x.example"
    assert one(objs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    objs = render({"api": {"podDisruptionBudget": {"enabled": False}}})
    assert not [o for o in objs if o["kind"] in ("PodDisruptionBudget", "HorizontalPodAutoscaler", "Ingress")]
    assert one(objs, "Deployment", f"{FULLNAME}-scheduler")["spec"]["replicas"] == 2


def test_images_default_from_global_and_override_per_role():
    objs = render({"global": {"image": {"tag": "9.9"}}, "scheduler": {"image": {"repository": "me/sched", "tag": "1.2"}}})
    assert pod(objs, API).spec["containers"][0]["image"] == "lorafleet/control-plane:9.9"
    assert pod(objs, SCHEDULER).spec["containers"][0]["image"] == "me/sched:1.2"
    assert all(c["image"] == "lorafleet/ray-worker:9.9" for p in pods(objs) if p.ray for c in p.containers())
    assert pod(render(), API).spec["containers"][0]["image"] == "lorafleet/control-plane:0.1.0"


def test_extra_env_and_tenant_defaults_reach_the_control_plane():
    objs = render({"extraEnv": [{"name": "FOO", "value": "bar"}], "tenantDefaults": {"maxQueuedJobs": 7},
                   "api": {"maxUploadBytes": 1073741824}})
    for owner in (API, SCHEDULER, MIGRATIONS):
        assert pod(objs, owner).env()["FOO"]["value"] == "bar"
    env = pod(objs, API).env()
    assert env["LORAFLEET_TENANT_MAX_QUEUED_JOBS"]["value"] == "7"
    assert env["LORAFLEET_MAX_UPLOAD_BYTES"]["value"] == "1073741824"
    assert not any("FOO" in p.env() for p in pods(objs) if p.ray)


# -- Ray groups: GPUs, placement, autoscaling ----------------------------------------------------


@pytest.mark.parametrize("values", ALL_SETS, ids=SET_IDS)
def test_worker_groups_request_their_gpus_and_heads_none(values):
    objs = render(values)
    for owner, spec in ray_cluster_specs(objs):
        assert spec["enableInTreeAutoscaling"] is True
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert "nvidia.com/gpu" not in str(head["template"]["spec"]["containers"][0]["resources"])
        source = values.get("ray" if owner.startswith("RayCluster") else "serve", {}).get("workerGroups")
        defaults = [{"name": "gpu", "gpus": 1, "minReplicas": 0 if owner.startswith("RayCluster") else 1, "maxReplicas": 4}]
        groups = {g["name"]: g for g in (source or defaults)}
        assert [g["groupName"] for g in spec["workerGroupSpecs"]] == list(groups), owner
        for g in spec["workerGroupSpecs"]:
            want = groups[g["groupName"]]
            gpus = want.get("gpus", 0)
            res = g["template"]["spec"]["containers"][0]["resources"]
            assert (g["minReplicas"], g["maxReplicas"]) == (want["minReplicas"], want["maxReplicas"])
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
            if gpus:
                assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == gpus, (owner, g["groupName"])
                assert g["rayStartParams"]["num-gpus"] == str(gpus)
            else:
                assert "nvidia.com/gpu" not in res.get("limits", {})
            assert g["template"]["spec"].get("nodeSelector", {}) == want.get("nodeSelector", {})
            if "tolerations" in want:
                assert g["template"]["spec"]["tolerations"] == want["tolerations"]


def test_default_gpu_groups_tolerate_the_gpu_taint():
    for _, spec in ray_cluster_specs(render()):
        tol = spec["workerGroupSpecs"][0]["template"]["spec"]["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tol


def test_serve_config_is_generated_from_values():
    values = {
        "baseModels": {"default": "a", "catalog": [{"id": "a", "sourceUri": "s3://m/a"}, {"id": "b", "sourceUri": "s3://m/b"}]},
        "serve": {"baseModel": "b", "adapterMemoryBytes": 5 << 30, "hostCacheAdapters": 50, "maxBatchSize": 12,
                  "autoscaling": {"minReplicas": 2, "maxReplicas": 6, "targetOngoingRequests": 3}},
        "objectStore": {"url": "s3://bkt/x"},
    }
    objs = render(values)
    cfg = yaml.safe_load(one(objs, "RayService")["spec"]["serveConfigV2"])
    [app] = cfg["applications"]
    assert app["import_path"] == "workers.serve.app:build_app"
    assert app["args"] == {"base_model_id": "b", "base_model_uri": "s3://m/b", "object_store_url": "s3://bkt/x",
                           "quantization": "nf4", "device_adapter_fraction": 0.1, "device_adapter_bytes": 5 << 30,
                           "host_adapters": 50, "max_batch": 12}
    # The args are settings the serving code knows, and the deployment is the one it defines.
    from workers.serve.app import LoraReplica
    from workers.serve.replica import ServeConfig

    loaded = ServeConfig.load(**{k: str(v) for k, v in app["args"].items()})
    assert (loaded.device_adapter_bytes, loaded.device_adapter_fraction) == (5 << 30, 0.1)
    [dep] = app["deployments"]
    assert dep["name"] == LoraReplica.name
    assert dep["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 3}
    assert dep["ray_actor_options"] == {"num_gpus": 1}
    assert pod(objs, API).env()["LORAFLEET_DEFAULT_BASE_MODEL"]["value"] == "a"
    # Without serve.baseModel the default model is served.
    cfg = yaml.safe_load(one(render({k: values[k] for k in ("baseModels",)}), "RayService")["spec"]["serveConfigV2"])
    assert cfg["applications"][0]["args"]["base_model_uri"] == "s3://m/a"


def test_ray_parts_can_be_turned_off():
    objs = render({"ray": {"enabled": False}, "serve": {"enabled": False}})
    assert not [o for o in objs if o["kind"] in ("RayCluster", "RayService")]
    env = pod(objs, API).env()
    assert "LORAFLEET_RAY_ADDRESS" not in env and "LORAFLEET_SERVE_URL" not in env


def test_notes_give_the_url_and_how_to_read_the_admin_token():
    from chart_helpers import notes

    text = notes()
    assert f"kubectl get secret -n {NAMESPACE} {FULLNAME}-auth -o jsonpath='{{.data.admin-token}}'" in text
    assert f"svc/{FULLNAME}-api" in text
    text = notes({"api": {"ingress": {"enabled": True, "host": "lf.example", "tls": [{"hosts": ["lf.example"]}]}}})
    assert "https://lf.example/v1" in text
    assert "lorafleet-auth" not in notes({"auth": {"existingSecret": "mine"}}).replace(f"{FULLNAME}-auth", "")
    assert "secret -n ai mine" in notes({"auth": {"existingSecret": "mine"}})
