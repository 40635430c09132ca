// The admin's view of the cluster: the queue by tenant, running jobs, capacity as the scheduler
// last saw it, serving's adapter cache. Each section from its admin route, refreshed together.
import { get } from "../api.js";
import { h, replace, table, when, duration, every } from "../dom.js";

const REFRESH_MS = 5000;

const num = (x) => (Number.isInteger(x) ? String(x) : x.toFixed(2));
const compute = (c) => `${num(c.cpus)} CPU · ${num(c.gpus)} GPU`;

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function kv(id, pairs) {
  return h("dl", { class: "kv", id }, pairs.map(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })]));
}

function queueSection(el, q) {
  replace(el, h("h2", { text: "Queue by tenant" }),
    q.tenants.length ? table([
      ["Tenant", (t) => t.tenant_name], ["Queued", (t) => t.queued], ["Running", (t) => t.running],
      ["Paused", (t) => t.paused], ["Queued demand", (t) => compute(t.queued_demand)],
      ["Running demand", (t) => compute(t.running_demand)],
      ["Oldest queued", (t) => (t.oldest_queued_age_s === null ? "–" : `${duration(t.oldest_queued_age_s)} ago`)],
    ], q.tenants, (t) => ({ "data-tenant": t.tenant_id })) : h("p", { class: "muted", text: "No queued or running jobs." }),
    h("h2", { text: `Running jobs (${q.running_jobs.length}${q.running_jobs_has_more ? "+" : ""})` }),
    q.running_jobs.length ? table([
      ["Job", (j) => j.id], ["Tenant", (j) => j.tenant_name], ["Status", (j) => h("span", { class: `status s-${j.status}`, text: j.status })],
      ["Method", (j) => j.method], ["Base", (j) => j.model], ["Started", (j) => when(j.started_at)],
      ["Checkpoint step", (j) => j.last_checkpoint_step ?? "–"],
      ["ETA", (j) => (j.estimated_finish ? when(j.estimated_finish) : "–")],
    ], q.running_jobs, (j) => ({ "data-job": j.id })) : h("p", { class: "muted", text: "None." }));
}

function capacitySection(el, c) {
  if (!c.observed) {
    replace(el, h("h2", { text: "Cluster capacity" }),
      h("p", { class: "muted", id: "capacity-none", text: "No scheduler has reported the cluster yet." }));
    return;
  }
  replace(el, h("h2", { text: "Cluster capacity" }), kv("capacity", [
    ["Total", compute(c.total)], ["Used", compute(c.used)], ["Free", compute(c.free)],
    ["Fine-tuning", compute(c.training)], ["Serving and other", compute(c.other)],
    ["Seen", `${when(c.observed_at)} (${duration(c.age_s)} ago, by the scheduler)`],
  ]));
}

function servingSection(el, s) {
  const title = h("h2", { text: "Serving" });
  if (!s.configured) return replace(el, title, h("p", { class: "muted", id: "serving-state", text: "No serving application is configured." }));
  if (!s.reachable) return replace(el, title, h("p", { class: "error", id: "serving-state", text: `Unreachable: ${s.error}` }));
  const r = s.replica;
  replace(el, title,
    h("p", { id: "serving-state", text: `Reachable · base ${r.base_model_id ?? "–"} · the replica that answered:` }),
    table([
      ["Cache", (c) => c.tier], ["Resident adapters", (c) => (c.max_adapters ? `${c.resident_adapters} / ${c.max_adapters}` : c.resident_adapters)],
      ["Bytes used", (c) => bytes(c.bytes_used)], ["Bytes free", (c) => bytes(c.bytes_free)],
      ["Hit rate", (c) => (c.hit_rate === null ? "–" : `${(100 * c.hit_rate).toFixed(1)}%`)],
      ["Hits / misses", (c) => `${c.hits} / ${c.misses}`], ["Evictions", (c) => c.evictions],
    ], r.caches, (c) => ({ "data-cache": c.tier })));
}

// Fills `el` and keeps it current; returns the function that stops the refresh.
export function clusterSections(el) {
  const queue = h("section", { id: "queue", class: "card" });
  const capacity = h("section", { id: "cluster", class: "card" });
  const serving = h("section", { id: "serving", class: "card" });
  replace(el, capacity, serving, queue);
  return every(REFRESH_MS, async () => {
    const [q, c, s] = await Promise.all([get("/v1/admin/queue"), get("/v1/admin/cluster"), get("/v1/admin/serving")]);
    queueSection(queue, q);
    capacitySection(capacity, c);
    servingSection(serving, s);
  });
}
