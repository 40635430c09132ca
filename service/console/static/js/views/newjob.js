import { get, request, post, schema, ApiError } from "../api.js";
import { h, replace } from "../dom.js";
import { methods, field } from "../schema.js";

const SHOWN_LINES = 50; // at most this many bad lines shown beside their text

function labelled(labelText, el, errId) {
  return h("div", { class: "field" }, h("label", { for: el.id, text: labelText }), el,
    h("span", { class: "field-error", id: errId || `err-${el.id}`, role: "alert" }));
}

function uploadBox(onUploaded) {
  const input = h("input", { id: "file-input", type: "file", accept: ".jsonl,.json,application/jsonl", class: "visually-hidden" });
  const zone = h("div", { id: "drop-zone", class: "drop", tabindex: "0", role: "button",
    "aria-describedby": "upload-result", text: "Drop a JSONL dataset here, or press Enter to choose one" });
  const result = h("div", { id: "upload-result", "aria-live": "polite" });
  async function upload(file) {
    replace(result, h("p", { class: "muted", text: `Uploading ${file.name}…` }));
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    try {
      const created = await request("POST", "/v1/files", { form });
      replace(result, h("p", { class: "ok" }, "Uploaded ", h("strong", { text: created.filename }), ` as ${created.id} (${created.examples} examples, ${created.format}).`));
      onUploaded(created);
    } catch (exc) {
      if (!(exc instanceof ApiError)) throw exc;
      const lines = (await file.text()).split("\n");
      replace(result, h("p", { class: "error", id: "upload-error", text: `${exc.code}: ${exc.message}` }),
        exc.errors.length ? h("ol", { class: "bad-lines", id: "bad-lines" }, exc.errors.slice(0, SHOWN_LINES).map((e) =>
          h("li", { "data-line": e.line },
            h("span", { class: "lineno", text: e.line ? `line ${e.line}` : "file" }),
            e.line ? h("code", { class: "linetext", text: (lines[e.line - 1] ?? "").slice(0, 300) }) : null,
            h("span", { class: "reason", text: e.reason })))) : null);
    }
  }
  input.addEventListener("change", () => input.files[0] && upload(input.files[0]));
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); input.click(); } });
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    zone.classList.remove("over");
    if (ev.dataTransfer.files[0]) upload(ev.dataTransfer.files[0]);
  });
  return h("section", { class: "card" }, h("h2", { text: "1. Dataset" }), zone, input, result);
}

export function newJobView(view) {
  const model = h("select", { id: "model", name: "model" });
  const trainingFile = h("select", { id: "training_file", name: "training_file" });
  const validationFile = h("select", { id: "validation_file", name: "validation_file" });
  const suffix = h("input", { id: "suffix", name: "suffix", type: "text", autocomplete: "off" });
  const seed = h("input", { id: "seed", name: "seed", type: "number", min: "0", step: "1" });
  const methodType = h("select", { id: "method", name: "method" });
  const hpBox = h("fieldset", { id: "hyperparameters" });
  const general = h("p", { class: "error", id: "form-error", role: "alert" });
  const form = h("form", { class: "card", novalidate: true },
    h("h2", { text: "2. Job" }),
    h("div", { class: "grid" }, labelled("Base model", model), labelled("Training file", trainingFile),
      labelled("Validation file (optional)", validationFile), labelled("Suffix (goes into the adapter id)", suffix),
      labelled("Seed (optional)", seed), labelled("Method", methodType)),
    hpBox, h("button", { type: "submit", id: "create-job", text: "Create job" }), general);
  let fields = [], methodList = [];

  async function loadFiles(selected) {
    const files = (await get("/v1/files", { limit: 100 })).data;
    const options = (withNone) => [withNone ? h("option", { value: "", text: "none" }) : null,
      files.map((f) => h("option", { value: f.id, text: `${f.filename} (${f.id}, ${f.examples} examples)` }))];
    replace(trainingFile, options(false));
    replace(validationFile, options(true));
    if (selected) trainingFile.value = selected;
  }

  function showMethod() {
    const m = methodList.find((x) => x.type === methodType.value);
    fields = Object.entries(m?.properties || {}).map(([name, prop]) => field(name, prop, m.unwrap, h));
    replace(hpBox, h("legend", { text: `Hyperparameters for ${methodType.value} (empty = the service's default)` }),
      h("div", { class: "grid" }, fields.map((f) => labelled(f.name, f.el))));
  }

  function clearErrors() {
    general.textContent = "";
    for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
  }

  // A problem's param names the field: "suffix", "method.lora.hyperparameters.r", …
  function showError(param, message) {
    const name = param ? param.split(".").pop() : null;
    const target = name && (form.querySelector(`#err-hp-${CSS.escape(name)}`) || form.querySelector(`#err-${CSS.escape(name)}`));
    if (target) target.textContent = message;
    else general.textContent = param ? `${param}: ${message}` : message;
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors();
    const hyperparameters = {};
    for (const f of fields) {
      const v = f.read();
      if (v !== undefined) hyperparameters[f.name] = v;
    }
    const body = { model: model.value, training_file: trainingFile.value,
      method: { type: methodType.value, [methodType.value]: { hyperparameters } } };
    if (validationFile.value) body.validation_file = validationFile.value;
    if (suffix.value) body.suffix = suffix.value;
    if (seed.value !== "") body.seed = Number(seed.value);
    try {
      const job = await post("/v1/fine_tuning/jobs", body);
      location.hash = `#/jobs/${job.id}`;
    } catch (exc) {
      if (!(exc instanceof ApiError)) throw exc;
      if (exc.errors.length) for (const e of exc.errors) showError(e.param, e.reason);
      else showError(exc.param, `${exc.code}: ${exc.message}`);
    }
  });
  methodType.addEventListener("change", showMethod);

  replace(view, h("h1", { text: "New fine-tuning job" }), uploadBox((f) => loadFiles(f.id)), form);
  (async () => {
    const [doc, models] = await Promise.all([schema(), get("/v1/models")]);
    methodList = methods(doc);
    replace(methodType, methodList.map((m) => h("option", { value: m.type, text: m.type })));
    methodType.value = methodList[0]?.defaultType || methodList[0]?.type;
    replace(model, models.data.filter((m) => m.owned_by === "lorafleet").map((m) => h("option", { value: m.id, text: m.id })));
    showMethod();
    await loadFiles();
  })().catch((exc) => { general.textContent = exc.message; });
}
