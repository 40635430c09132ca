import { get, schema } from "../api.js";
import { h, replace, table, when, duration, every, methodOf } from "../dom.js";

// The statuses the API's own list filter accepts (a new state appears without page changes).
async function statuses() {
  const param = (await schema()).paths["/v1/fine_tuning/jobs"].get.parameters.find((p) => p.name === "status");
  return (param?.schema?.anyOf || [param?.schema]).flatMap((s) => s?.enum || []);
}

export function jobsView(view) {
  const filter = h("select", { id: "status-filter" }, h("option", { value: "", text: "all" }));
  statuses().then((names) => filter.append(...names.map((s) => h("option", { value: s, text: s }))));
  const list = h("div", { id: "jobs-list", "aria-live": "polite" });
  replace(view, h("h1", { text: "Fine-tuning jobs" }),
    h("div", { class: "toolbar" }, h("label", { for: "status-filter", text: "Status" }), filter,
      h("a", { class: "button", href: "#/new", text: "New job" })),
    list);
  const refresh = async () => {
    const page = await get("/v1/fine_tuning/jobs", { limit: 100, status: filter.value });
    const now = Date.now() / 1000;
    replace(list, page.data.length ? table([
      ["Job", (j) => h("a", { href: `#/jobs/${j.id}`, text: j.id })],
      ["Suffix", (j) => j.user_provided_suffix || "–"],
      ["Status", (j) => h("span", { class: `status s-${j.status}`, text: j.status })],
      ["Method", methodOf],
      ["Base", (j) => j.model],
      ["Created", (j) => when(j.created_at)],
      ["Duration", (j) => duration((j.finished_at || now) - j.created_at)],
      ["Tokens", (j) => (j.trained_tokens ?? "–")],
    ], page.data, (j) => ({ "data-job": j.id })) : h("p", { class: "muted", text: "No jobs yet." }));
  };
  filter.addEventListener("change", refresh);
  return every(3000, refresh);
}
