// Form fields from the API's OpenAPI document, so a new method or hyperparameter appears in the
// console without a page change.

export function resolver(doc) {
  const deref = (s) => {
    while (s && s.$ref) s = doc.components.schemas[s.$ref.split("/").pop()];
    return s;
  };
  // "X or null" is X; any other union stays a union.
  const unwrap = (s) => {
    s = deref(s);
    const alts = (s?.anyOf || []).filter((a) => a.type !== "null");
    return alts.length === 1 ? { ...deref(alts[0]), default: s.default ?? alts[0].default, title: s.title } : s;
  };
  return { deref, unwrap };
}

// Method types and, per type, the hyperparameter properties the API documents.
export function methods(doc) {
  const { deref, unwrap } = resolver(doc);
  const create = deref(doc.paths["/v1/fine_tuning/jobs"].post.requestBody.content["application/json"].schema);
  const methodIn = unwrap(create.properties.method);
  const types = unwrap(methodIn.properties.type).enum || [];
  return types.map((type) => {
    const params = unwrap(methodIn.properties[type]);
    const hp = params?.properties?.hyperparameters ? unwrap(params.properties.hyperparameters) : null;
    return { type, defaultType: unwrap(methodIn.properties.type).default, properties: hp?.properties || {}, unwrap };
  });
}

// One input for one schema property: {element, read()} where read() gives the JSON value or undefined.
export function field(name, prop, unwrap, h) {
  const p = unwrap(prop);
  const id = `hp-${name}`;
  const common = { id, name, "aria-describedby": `err-${id}` };
  let el, read;
  if (p.enum) {
    el = h("select", common, h("option", { value: "", text: p.default !== undefined ? `default (${p.default})` : "default" }),
      p.enum.map((v) => h("option", { value: String(v), text: String(v) })));
    read = () => (el.value === "" ? undefined : el.value);
  } else if (p.type === "integer" || p.type === "number") {
    el = h("input", { ...common, type: "number", step: p.type === "integer" ? "1" : "any", min: p.minimum, max: p.maximum,
      placeholder: p.default !== undefined && p.default !== null ? String(p.default) : "" });
    read = () => (el.value === "" ? undefined : Number(el.value));
  } else if (p.type === "boolean") {
    el = h("select", common, h("option", { value: "", text: "default" }), h("option", { value: "true", text: "true" }),
      h("option", { value: "false", text: "false" }));
    read = () => (el.value === "" ? undefined : el.value === "true");
  } else {
    // strings and unions (e.g. a list of module names, or one word such as all-linear): JSON if it parses
    const takesList = (p.anyOf || [p]).some((a) => a.type === "array");
    el = h("input", { ...common, type: "text", placeholder: p.default !== undefined && p.default !== null ? String(p.default) : "" });
    read = () => {
      const v = el.value.trim();
      if (!v) return undefined;
      try { return JSON.parse(v); } catch { /* a bare word */ }
      return takesList && v.includes(",") ? v.split(",").map((s) => s.trim()).filter(Boolean) : v;
    };
  }
  return { name, el, read };
}
