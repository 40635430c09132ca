// Element building without HTML strings: every value lands as a text node or an attribute,
// so a tenant's file name or suffix can never become markup.

export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "text") el.textContent = String(value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function table(columns, rows, rowProps = () => ({})) {
  return h("div", { class: "scroll" },
    h("table", {},
      h("thead", {}, h("tr", {}, columns.map(([label]) => h("th", { scope: "col", text: label })))),
      h("tbody", {}, rows.map((row) => h("tr", rowProps(row),
        columns.map(([label, get]) => h("td", { "data-label": label }, get(row))))))));
}

export function when(ts) {
  if (!ts) return "–";
  return new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19);
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || seconds < 0) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

export function flash(message) {
  const el = document.getElementById("flash");
  el.textContent = message || "";
  el.hidden = !message;
}

// Runs fn now and then every ms until the returned stop is called; errors show in the flash.
export function every(ms, fn) {
  let timer, stopped = false;
  const tick = async () => {
    try {
      await fn();
    } catch (exc) {
      flash(exc.code ? `${exc.code}: ${exc.message}` : String(exc));
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

export function methodOf(job) {
  return job.method?.type || "–";
}
