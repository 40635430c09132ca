import { get, hasPath, streamChat, ApiError } from "../api.js";
import { h, replace } from "../dom.js";

const MAX_ADAPTERS = 4;

function number(id, label, attrs) {
  const el = h("input", { id, type: "number", ...attrs });
  return [el, h("div", { class: "field" }, h("label", { for: id, text: label }), el)];
}

export function playgroundView(view) {
  const prompt = h("textarea", { id: "prompt", rows: 3, required: true });
  const [temperature, tField] = number("temperature", "Temperature", { min: 0, max: 2, step: "0.1", value: "0" });
  const [topP, pField] = number("top_p", "top_p", { min: 0, max: 1, step: "0.05", value: "1" });
  const [maxTokens, mField] = number("max_tokens", "Max tokens", { min: 1, max: 4096, step: "1", value: "64" });
  const choices = h("fieldset", { id: "models" }, h("legend", { text: `Base model and up to ${MAX_ADAPTERS} adapters` }));
  const answers = h("div", { id: "answers", class: "answers" });
  // A live weighted blend of the checked adapters, per request (docs/API.md "Blends"); offered
  // only where the API has blends (their offline route shipped with the live one).
  const blendOn = h("input", { type: "checkbox", id: "blend-on" });
  const sliders = h("div", { class: "grid", id: "blend-weights" });
  const blend = h("fieldset", { id: "blend", hidden: true },
    h("legend", { text: "Weighted blend" }),
    h("div", { class: "check" }, blendOn, h("label", { for: "blend-on", text: "Also ask a live blend of the checked adapters" })),
    sliders);
  const send = h("button", { type: "submit", id: "send", text: "Send" });
  const form = h("form", { class: "card" }, h("label", { for: "prompt", text: "Prompt" }), prompt,
    h("div", { class: "grid" }, tField, pField, mField), choices, blend, send);
  replace(view, h("h1", { text: "Playground" }), form, answers);

  const boxes = () => [...choices.querySelectorAll("input[type=checkbox]")];
  const checkedAdapters = () => boxes().filter((b) => b.dataset.kind === "adapter" && b.checked).map((b) => b.value);
  let canBlend = false;
  const weights = new Map(); // adapter id -> its weight slider, kept while it stays checked
  function showBlend() {
    const picked = checkedAdapters();
    blend.hidden = !canBlend || picked.length < 2;
    replace(sliders, picked.map((id) => {
      if (!weights.has(id)) weights.set(id, h("input", { type: "range", id: `w-${id}`, min: "-1", max: "2", step: "0.1", value: "1" }));
      const slider = weights.get(id);
      const shown = h("output", { for: slider.id, text: slider.value });
      slider.oninput = () => { shown.textContent = slider.value; };
      return h("div", { class: "field" }, h("label", { for: slider.id }, "weight of ", h("span", { text: id })), slider, shown);
    }));
  }
  choices.addEventListener("change", () => {
    const adapters = boxes().filter((b) => b.dataset.kind === "adapter");
    const full = adapters.filter((b) => b.checked).length >= MAX_ADAPTERS;
    for (const b of adapters) b.disabled = full && !b.checked;
    showBlend();
  });

  function panel(modelId, title = modelId) {
    const text = h("p", { class: "answer-text" });
    const stats = h("p", { class: "muted stats", text: "waiting…" });
    const el = h("article", { class: "answer card", "data-model": modelId }, h("h2", { text: title }), text, stats);
    return { el, text, stats };
  }

  async function ask(p, modelId, extra = {}) {
    const started = performance.now();
    let first, chunks = 0;
    const body = { model: modelId, messages: [{ role: "user", content: prompt.value }],
      temperature: Number(temperature.value), top_p: Number(topP.value), max_tokens: Number(maxTokens.value), ...extra };
    try {
      await streamChat(body, (delta) => {
        first ??= performance.now();
        chunks += 1;
        p.text.append(delta);
        p.stats.textContent = `${chunks} tokens · first after ${Math.round(first - started)} ms`;
      });
      const elapsed = (performance.now() - (first ?? started)) / 1000;
      p.stats.textContent = `${chunks} tokens · time to first token ${Math.round((first ?? performance.now()) - started)} ms · ${(chunks / Math.max(elapsed, 1e-3)).toFixed(1)} tokens/s`;
      p.el.classList.add("done");
    } catch (exc) {
      p.stats.textContent = exc instanceof ApiError ? `${exc.code}: ${exc.message}` : String(exc);
      p.el.classList.add("failed");
    }
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const picked = boxes().filter((b) => b.checked).map((b) => b.value);
    if (!picked.length || !prompt.value.trim()) return;
    const asks = picked.map((m) => [panel(m), m, {}]);
    const blended = checkedAdapters();
    if (!blend.hidden && blendOn.checked) {
      const parts = blended.map((id) => ({ model: id, weight: Number(weights.get(id).value) }));
      asks.push([panel("blend", `blend: ${parts.map((b) => `${b.weight}×${b.model}`).join(" + ")}`), blended[0], { adapters: parts }]);
    }
    replace(answers, asks.map(([p]) => p.el));
    send.disabled = true;
    await Promise.all(asks.map((args) => ask(...args)));
    send.disabled = false;
  });

  hasPath("/v1/adapters/blend").then((yes) => { canBlend = yes; showBlend(); });
  get("/v1/models").then(({ data }) => {
    const option = (m, kind, checked) => {
      const id = `pick-${m.id}`;
      return h("div", { class: "check" }, h("input", { type: "checkbox", id, value: m.id, "data-kind": kind, checked }),
        h("label", { for: id, text: m.id }));
    };
    choices.append(...data.filter((m) => m.owned_by === "lorafleet").map((m, i) => option(m, "base", i === 0)),
      ...data.filter((m) => m.owned_by !== "lorafleet").map((m) => option(m, "adapter", false)));
  });
}
