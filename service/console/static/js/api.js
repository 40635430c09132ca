// The public REST API, called exactly as the SDK calls it. The credential lives in this tab's
// sessionStorage only: never a cookie, a URL or a log line.

const KEY = "lorafleet.credential";

export function credential() {
  const raw = sessionStorage.getItem(KEY);
  return raw ? JSON.parse(raw) : null;
}

export function signIn(role, secret) {
  sessionStorage.setItem(KEY, JSON.stringify({ role, secret }));
}

export function signOut() {
  sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.code = problem.code || `http_${status}`;
    this.param = problem.param || null;
    this.errors = Array.isArray(problem.errors) ? problem.errors : [];
  }
}

function headers(secret) {
  return secret ? { Authorization: `Bearer ${secret}` } : {};
}

async function problemOf(resp) {
  try {
    return await resp.json();
  } catch {
    return { detail: `${resp.status} ${resp.statusText}` };
  }
}

// `secret` tries a credential not yet stored (sign-in); otherwise the stored one is used.
export async function request(method, path, { json, form, query, raw, secret } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query || {})) if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  const init = { method, headers: headers(secret ?? credential()?.secret), credentials: "omit", cache: "no-store" };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (form) {
    init.body = form;
  }
  const resp = await fetch(url, init);
  if (resp.status === 401 && secret === undefined && credential()) {
    // revoked, or the tenant disabled: forget it and ask again (app.js listens)
    signOut();
    window.dispatchEvent(new CustomEvent("lorafleet:signed-out", { detail: await problemOf(resp) }));
    throw new ApiError(401, { detail: "signed out", code: "unauthorized" });
  }
  if (!resp.ok) throw new ApiError(resp.status, await problemOf(resp));
  if (raw) return resp;
  return resp.status === 204 ? null : resp.json();
}

export const get = (path, query) => request("GET", path, { query });
export const post = (path, json) => request("POST", path, { json: json ?? {} });
export const patch = (path, json) => request("PATCH", path, { json });
export const del = (path) => request("DELETE", path);

// Every page of a cursor-paged list (OpenAI style: data, has_more, last_id).
export async function all(path, query = {}) {
  const out = [];
  let after;
  for (;;) {
    const page = await get(path, { ...query, limit: 100, after });
    out.push(...page.data);
    if (!page.has_more || !page.data.length) return out;
    after = page.last_id || page.data[page.data.length - 1].id;
  }
}

let openapi;
// The API's own description: the new-job form and the optional buttons follow it.
export async function schema() {
  openapi ??= fetch("/openapi.json", { credentials: "omit" }).then((r) => r.json());
  return openapi;
}

export async function hasPath(path, method = "post") {
  const doc = await schema();
  return Boolean(doc.paths?.[path]?.[method]);
}

// Server-sent events of a streaming completion: calls onDelta(text) per chunk.
export async function streamChat(body, onDelta) {
  const resp = await request("POST", "/v1/chat/completions", { json: { ...body, stream: true }, raw: true });
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.status || 500, { detail: chunk.error.message, code: chunk.error.code });
        for (const choice of chunk.choices || []) if (choice.delta?.content) onDelta(choice.delta.content);
      }
    }
  }
}
