import { get, del, post, request, hasPath, ApiError } from "../api.js";
import { h, replace, table, when, flash } from "../dom.js";

function size(bytes) {
  return bytes < 1024 ? `${bytes} B` : bytes < 1 << 20 ? `${(bytes / 1024).toFixed(1)} KiB` : `${(bytes / (1 << 20)).toFixed(1)} MiB`;
}

// Files need the Authorization header, so a plain link cannot fetch them: fetch, then save the blob.
async function download(adapterId, name) {
  const resp = await request("GET", `/v1/adapters/${encodeURIComponent(adapterId)}/files/${encodeURIComponent(name)}`, { raw: true });
  const url = URL.createObjectURL(await resp.blob());
  const a = h("a", { href: url, download: `${adapterId}-${name}` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

export function modelsView(view) {
  const base = h("section", {}, h("h2", { text: "Base models" }));
  const adapters = h("section", { id: "adapters" }, h("h2", { text: "Your adapters" }));
  const note = h("p", { id: "models-note", class: "ok", role: "status" });
  replace(view, h("h1", { text: "Models" }), note, base, adapters);
  const guard = (fn) => async () => {
    try {
      await fn();
      await load();
    } catch (exc) {
      flash(exc instanceof ApiError ? `${exc.code}: ${exc.message}` : String(exc));
    }
  };
  async function load() {
    const models = (await get("/v1/models")).data;
    const canExport = await hasPath("/v1/models/{adapter_id}/exports");
    replace(base, h("h2", { text: "Base models" }), table([["Model", (m) => m.id], ["Added", (m) => when(m.created)]],
      models.filter((m) => m.owned_by === "lorafleet")));
    const mine = models.filter((m) => m.owned_by !== "lorafleet");
    const details = await Promise.all(mine.map((m) => get(`/v1/adapters/${encodeURIComponent(m.id)}`)));
    replace(adapters, h("h2", { text: "Your adapters" }), details.length ? table([
      ["Adapter", (a) => a.id], ["Version", (a) => a.version], ["Method", (a) => a.method], ["Base", (a) => a.base_model],
      ["Job", (a) => h("a", { href: `#/jobs/${a.job_id}`, text: a.job_id })],
      ["Size", (a) => size(a.files.reduce((n, f) => n + f.bytes, 0))],
      ["Files (sha256)", (a) => h("ul", { class: "plain" }, a.files.map((f) => h("li", {},
        h("button", { type: "button", class: "link", text: f.name, onclick: guard(() => download(a.id, f.name)) }),
        " ", h("code", { class: "sha", title: f.sha256, text: f.sha256.slice(0, 12) }))))],
      ["", (a) => h("div", { class: "actions" },
        canExport ? h("button", { type: "button", text: "Export", "aria-label": `Export ${a.id} merged into its base`,
          onclick: guard(async () => { const op = await post(`/v1/models/${encodeURIComponent(a.id)}/exports`); note.textContent = `Export ${op.id} of ${a.id}: ${op.status}`; }) }) : null,
        h("button", { type: "button", class: "danger", text: "Delete", "aria-label": `Delete ${a.id}`,
          onclick: guard(async () => { if (confirm(`Delete ${a.id}?`)) await del(`/v1/models/${encodeURIComponent(a.id)}`); }) }))],
    ], details, (a) => ({ "data-adapter": a.id })) : h("p", { class: "muted", text: "No adapters yet: a succeeded job publishes one." }));
  }
  load().catch((exc) => flash(exc.message));
}
