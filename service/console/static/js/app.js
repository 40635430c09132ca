// Hash routes (#/jobs, #/jobs/<id>, …): one page, so the server serves a single file and the
// credential never leaves this tab.
import { credential, signIn, signOut, request, ApiError } from "./api.js";
import { h, replace, flash } from "./dom.js";
import { jobsView } from "./views/jobs.js";
import { jobView } from "./views/job.js";
import { newJobView } from "./views/newjob.js";
import { modelsView } from "./views/models.js";
import { playgroundView } from "./views/playground.js";
import { adminView } from "./views/admin.js";

const view = document.getElementById("view");
let stopCurrent = () => {};

const routes = [
  [/^#\/jobs\/([\w-]+)$/, "tenant", jobView],
  [/^#\/jobs$/, "tenant", jobsView],
  [/^#\/new$/, "tenant", newJobView],
  [/^#\/models$/, "tenant", modelsView],
  [/^#\/playground$/, "tenant", playgroundView],
  [/^#\/admin$/, "admin", adminView],
];

function signInView(reason) {
  const secret = h("input", { id: "secret", type: "password", autocomplete: "off", required: true });
  const role = h("select", { id: "role" },
    h("option", { value: "tenant", text: "Tenant API key" }),
    h("option", { value: "admin", text: "Admin token" }));
  const error = h("p", { id: "signin-error", class: "error", role: "alert", text: reason });
  const form = h("form", { class: "card narrow", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title", text: "Sign in" }),
    h("label", { for: "role", text: "Sign in with" }), role,
    h("label", { for: "secret", text: "Key or token" }), secret,
    h("button", { type: "submit", text: "Sign in" }), error);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    const value = secret.value.trim();
    try {
      // any cheap read that needs the credential: a 401/403 says it is wrong; kept only if right
      await request("GET", role.value === "admin" ? "/v1/admin/tenants" : "/v1/fine_tuning/jobs",
        { query: { limit: 1 }, secret: value });
      signIn(role.value, value);
      location.hash = role.value === "admin" ? "#/admin" : "#/jobs";
      render();
    } catch (exc) {
      error.textContent = exc instanceof ApiError ? `${exc.code}: ${exc.message}` : String(exc);
    }
  });
  replace(view, form);
  secret.focus();
}

export function render(reason) {
  stopCurrent();
  stopCurrent = () => {};
  flash("");
  const cred = credential();
  const nav = document.getElementById("nav");
  const out = document.getElementById("signout");
  nav.hidden = out.hidden = !cred;
  if (!cred) return signInView(reason);
  for (const link of nav.querySelectorAll("a")) {
    link.hidden = link.dataset.role !== cred.role;
    link.toggleAttribute("aria-current", location.hash.startsWith(link.getAttribute("href")));
  }
  const hash = location.hash || (cred.role === "admin" ? "#/admin" : "#/jobs");
  for (const [pattern, role, build] of routes) {
    const match = hash.match(pattern);
    if (match && role === cred.role) {
      replace(view);
      const stop = build(view, ...match.slice(1));
      if (typeof stop === "function") stopCurrent = stop;
      view.focus({ preventScroll: true }); // keyboard and screen-reader users start at the new view
      return;
    }
  }
  location.hash = cred.role === "admin" ? "#/admin" : "#/jobs";
}

document.getElementById("signout").addEventListener("click", () => {
  signOut();
  location.hash = "";
  render();
});
window.addEventListener("hashchange", () => render());
window.addEventListener("lorafleet:signed-out", (ev) => {
  render(`Signed out: the API refused the key (${ev.detail.code || 401}: ${ev.detail.detail || "unauthorized"}).`);
});
render();
