import { get, streamChat, ApiError } from "../api.js";
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
  const send = h("button", { type: "submit", id: "send", text: "Send" });
  const form = h("form", { class: "card" }, h("label", { for: "prompt", text: "Prompt" }), prompt,
    h("div", { class: "grid" }, tField, pField, mField), choices, send);
  replace(view, h("h1", { text: "Playground" }), form, answers);

  const boxes = () => [...choices.querySelectorAll("input[type=checkbox]")];
  choices.addEventListener("change", () => {
    const adapters = boxes().filter((b) => b.dataset.kind === "adapter");
    const full = adapters.filter((b) => b.checked).length >= MAX_ADAPTERS;
    for (const b of adapters) b.disabled = full && !b.checked;
  });

  function panel(modelId) {
    const text = h("p", { class: "answer-text" });
    const stats = h("p", { class: "muted stats", text: "waiting…" });
    const el = h("article", { class: "answer card", "data-model": modelId }, h("h2", { text: modelId }), text, stats);
    return { el, text, stats };
  }

  async function ask(modelId, p) {
    const started = performance.now();
    let first, chunks = 0;
    const body = { model: modelId, messages: [{ role: "user", content: prompt.value }],
      temperature: Number(temperature.value), top_p: Number(topP.value), max_tokens: Number(maxTokens.value) };
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
    const panels = picked.map(panel);
    replace(answers, panels.map((p) => p.el));
    send.disabled = true;
    await Promise.all(picked.map((m, i) => ask(m, panels[i])));
    send.disabled = false;
  });

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
