"""The scheduling policy alone: a pure function, so each rule is checked on a hand-made state."""

from __future__ import annotations

from service.scheduling.policy import Capacity, ClusterView, QueuedJob, RunningJob, TenantState, plan


def _job(i: int, tenant: str, gpus: float, wall_clock_s: float | None = 3600) -> QueuedJob:
    return QueuedJob(f"j{i:03d}", tenant, Capacity(cpus=1, gpus=gpus), wall_clock_s)


def _view(free_gpus: float, total_gpus: float = 8, slots: int = 100) -> ClusterView:
    return ClusterView(free=Capacity(64, free_gpus), budget=Capacity(64, total_gpus), slots=slots, now=0.0)


def test_tenants_take_turns_in_gpu_units():
    heads = {"a": [_job(1, "a", 1), _job(2, "a", 1), _job(3, "a", 1)], "b": [_job(4, "b", 2), _job(5, "b", 2)]}
    tenants = {t: TenantState(t) for t in heads}
    started = [j.id for j in plan(_view(6), tenants, heads, []).start]
    # a (1 GPU) then b (2 GPUs); then a twice more before b's second: b already holds 2.
    assert started == ["j001", "j004", "j002", "j003"]


def test_least_used_tenant_first():
    heads = {"a": [_job(1, "a", 1)], "b": [_job(2, "b", 1)]}
    tenants = {"a": TenantState("a", usage=7200.0), "b": TenantState("b", usage=10.0)}
    assert [j.id for j in plan(_view(1), tenants, heads, []).start] == ["j002"]


def test_reservation_holds_gpus_and_backfills_only_what_cannot_delay_it():
    # 8 GPUs, 6 held by a run that ends at t=1000 (its wall-clock limit); 2 free.
    running = [RunningJob("x", Capacity(1, 6), deadline=1000.0)]
    heads = {"big": [_job(1, "big", 8)],
             "long": [_job(2, "long", 1, wall_clock_s=5000)],  # would still run at t=1000: held back
             "short": [_job(3, "short", 1, wall_clock_s=500)]}  # ends by t=500: backfills
    tenants = {t: TenantState(t) for t in heads} | {"x": TenantState("x", usage=1e6)}
    out = plan(_view(2), tenants, heads, running)
    assert out.reserved.id == "j001"
    assert [j.id for j in out.start] == ["j003"]


def test_backfill_into_capacity_the_reserved_job_does_not_need():
    # 4 free of 8; the reserved job needs 6: it starts when the 4-GPU run ends (t=1000), and 2
    # GPUs are spare then, so a job confined to those may start now however long it runs.
    running = [RunningJob("x", Capacity(1, 4), deadline=1000.0)]
    heads = {"big": [_job(1, "big", 6)], "small": [_job(2, "small", 2, wall_clock_s=None)],
             "more": [_job(3, "more", 1, wall_clock_s=None)]}
    tenants = {t: TenantState(t) for t in heads} | {"x": TenantState("x", usage=1e6)}
    out = plan(_view(4), tenants, heads, running)
    assert out.reserved.id == "j001"
    assert [j.id for j in out.start] == ["j002"]  # the spare 2 are taken; nothing more


def test_tenant_limits_and_slots():
    heads = {"a": [_job(i, "a", 1) for i in range(5)], "b": [_job(10 + i, "b", 1) for i in range(5)]}
    tenants = {"a": TenantState("a", max_concurrent=Capacity(64, 2)), "b": TenantState("b", max_concurrent_jobs=1)}
    out = plan(_view(8), tenants, heads, [])
    assert sorted(j.tenant_id for j in out.start) == ["a", "a", "b"]
    assert len(plan(_view(8, slots=2), {t: TenantState(t) for t in heads}, heads, []).start) == 2


def test_cpu_cluster_shares_cpus():
    view = ClusterView(free=Capacity(4, 0), budget=Capacity(4, 0), slots=10, now=0.0)
    heads = {"a": [QueuedJob("j1", "a", Capacity(2, 0), None), QueuedJob("j2", "a", Capacity(2, 0), None)],
             "b": [QueuedJob("j3", "b", Capacity(1, 0), None)]}
    assert [j.id for j in plan(view, {t: TenantState(t) for t in heads}, heads, []).start] == ["j1", "j3"]
