import { all, post, patch, del, ApiError } from "../api.js";
import { h, replace, table, when, flash } from "../dom.js";
import { clusterSections } from "./cluster.js";

const LIMITS = [["max_concurrent_jobs", "Concurrent jobs"], ["max_queued_jobs", "Queued jobs"], ["requests_per_minute", "Requests / min"]];

export function adminView(view) {
  const name = h("input", { id: "tenant-name", type: "text", required: true, autocomplete: "off" });
  const limitInputs = LIMITS.map(([key, label]) => [key, label, h("input", { id: `tenant-${key}`, type: "number", min: "0", step: "1" })]);
  const createError = h("p", { class: "error", role: "alert", id: "tenant-error" });
  const create = h("form", { class: "card", id: "tenant-form" }, h("h2", { text: "New tenant" }),
    h("div", { class: "grid" },
      h("div", { class: "field" }, h("label", { for: "tenant-name", text: "Name" }), name),
      limitInputs.map(([, label, el]) => h("div", { class: "field" }, h("label", { for: el.id, text: `${label} (optional)` }), el))),
    h("button", { type: "submit", text: "Create tenant" }), createError);
  const tenants = h("section", { id: "tenants" });
  const keys = h("section", { id: "keys", class: "card", hidden: true });
  const cluster = h("div", { id: "cluster-overview", class: "columns" });
  replace(view, h("h1", { text: "Admin" }), cluster, create, keys, tenants);
  const guard = (fn) => async () => {
    try {
      await fn();
    } catch (exc) {
      flash(exc instanceof ApiError ? `${exc.code}: ${exc.message}` : String(exc));
    }
  };

  async function showKeys(tenant, created) {
    keys.hidden = false;
    const list = await all(`/v1/admin/tenants/${tenant.id}/api_keys`);
    const keyName = h("input", { id: "key-name", type: "text", autocomplete: "off" });
    const form = h("form", { class: "toolbar" }, h("label", { for: "key-name", text: "Label" }), keyName,
      h("button", { type: "submit", id: "create-key", text: "Create key" }));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      guard(async () => showKeys(tenant, await post(`/v1/admin/tenants/${tenant.id}/api_keys`, keyName.value ? { name: keyName.value } : {})))();
    });
    replace(keys, h("h2", {}, "Keys of ", h("span", { text: tenant.name })),
      created ? h("div", { class: "secret", role: "status" }, "New key (shown once, copy it now): ",
        h("output", { id: "new-key", text: created.key })) : null,
      table([["Key", (k) => k.id], ["Label", (k) => k.name || "–"], ["Prefix", (k) => k.prefix],
        ["Created", (k) => when(k.created_at)], ["Revoked", (k) => when(k.revoked_at)],
        ["", (k) => (k.revoked_at ? null : h("button", { type: "button", class: "danger", text: "Revoke", "aria-label": `Revoke ${k.id}`,
          onclick: guard(async () => { await del(`/v1/admin/api_keys/${k.id}`); await showKeys(tenant); }) }))]], list),
      form);
  }

  async function load() {
    const rows = (await all("/v1/admin/tenants")).sort((x, y) => y.created_at - x.created_at);
    replace(tenants, h("h2", { text: `Tenants (${rows.length})` }), table([
      ["Name", (t) => t.name], ["Id", (t) => t.id],
      ["Status", (t) => h("span", { class: `status s-${t.status}`, text: t.status })],
      ...LIMITS.map(([key, label]) => [label, (t) => t[key]]),
      ["Created", (t) => when(t.created_at)],
      ["", (t) => h("div", { class: "actions" },
        h("button", { type: "button", text: "Keys", "aria-label": `Keys of ${t.name}`, onclick: guard(() => showKeys(t)) }),
        h("button", { type: "button", text: t.status === "active" ? "Disable" : "Enable", "aria-label": `${t.status === "active" ? "Disable" : "Enable"} ${t.name}`,
          onclick: guard(async () => { await patch(`/v1/admin/tenants/${t.id}`, { status: t.status === "active" ? "disabled" : "active" }); await load(); }) }))],
    ], rows, (t) => ({ "data-tenant": t.id })));
  }

  create.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    createError.textContent = "";
    const body = { name: name.value };
    for (const [key, , el] of limitInputs) if (el.value !== "") body[key] = Number(el.value);
    try {
      const tenant = await post("/v1/admin/tenants", body);
      create.reset();
      await load();
      await showKeys(tenant);
    } catch (exc) {
      if (!(exc instanceof ApiError)) throw exc;
      createError.textContent = `${exc.param ? exc.param + ": " : ""}${exc.message}`;
    }
  });
  load().catch((exc) => flash(exc.message));
  return clusterSections(cluster);
}
