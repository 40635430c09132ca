import { get, post, hasPath, ApiError } from "../api.js";
import { h, replace, table, when, duration, every, flash, methodOf } from "../dom.js";
import { lossChart } from "../chart.js";

const MAX_LOG_LINES = 1000; // the newest; the API keeps them all
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
// Which action each state allows; pause/resume appear only where the API has those routes.
const ACTIONS = {
  cancel: (s) => ["validating_files", "queued", "running", "pausing", "paused"].includes(s),
  pause: (s) => s === "running",
  resume: (s) => s === "paused",
};

function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .map(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)]));
}

function hyperparameters(job) {
  const method = job.method || {};
  const resolved = method[method.type]?.hyperparameters || job.hyperparameters || {};
  return kv(Object.entries(resolved).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : String(v)]));
}

export function jobView(view, jobId) {
  const header = h("div", { class: "toolbar" });
  const summary = h("div", { id: "job-summary" });
  const chartBox = h("div", { id: "loss-chart", class: "chart", role: "img", "aria-label": "Loss curve" });
  const progress = h("div", { id: "job-progress" });
  const hp = h("section", {}, h("h2", { text: "Hyperparameters (resolved)" }));
  const checkpoints = h("section", {}, h("h2", { text: "Checkpoints" }));
  const log = h("ol", { id: "events", class: "events" });
  replace(view, h("h1", { id: "job-title", text: jobId }), header, progress, chartBox, summary,
    h("div", { class: "columns" }, hp, checkpoints),
    h("section", {}, h("h2", { text: "Events" }), log));
  const chart = lossChart(chartBox);
  let lastEvent, lastMetrics = {}, job, stopped = false;

  const act = (action) => async () => {
    try {
      await post(`/v1/fine_tuning/jobs/${jobId}/${action}`);
      await serial();
    } catch (exc) {
      flash(exc instanceof ApiError ? `${exc.code}: ${exc.message}` : String(exc));
    }
  };

  async function buttons() {
    const shown = [];
    for (const action of Object.keys(ACTIONS)) {
      if (ACTIONS[action](job.status) && await hasPath(`/v1/fine_tuning/jobs/{job_id}/${action}`)) {
        shown.push(h("button", { type: "button", id: `job-${action}`, text: action[0].toUpperCase() + action.slice(1), onclick: act(action) }));
      }
    }
    replace(header, h("span", { id: "job-status", class: `status s-${job.status}`, text: job.status }), shown);
  }

  async function events() {
    for (;;) {
      const page = await get(`/v1/fine_tuning/jobs/${jobId}/events`, { order: "asc", limit: 100, after: lastEvent });
      for (const e of page.data) {
        if (e.type === "metrics" && e.data) {
          chart.add(e.data);
          if (e.data.total_steps) lastMetrics = e.data;
        }
        log.append(h("li", { class: `lvl-${e.level}` }, h("time", { text: when(e.created_at) }), " ", e.message));
        if (log.childElementCount > MAX_LOG_LINES) log.firstElementChild.remove();
      }
      if (page.data.length) lastEvent = page.data[page.data.length - 1].id;
      if (!page.has_more) break;
    }
    chart.draw();
  }

  async function refresh() {
    job = await get(`/v1/fine_tuning/jobs/${jobId}`);
    document.getElementById("job-title").textContent = job.user_provided_suffix ? `${job.id} · ${job.user_provided_suffix}` : job.id;
    await events();
    await buttons();
    const m = lastMetrics;
    replace(progress, m.total_steps ? [
      h("progress", { max: m.total_steps, value: job.status === "succeeded" ? m.total_steps : m.step, "aria-label": "Progress" }),
      ` step ${m.step} / ${m.total_steps}`,
      !TERMINAL.has(job.status) && m.eta_s !== undefined ? ` · ETA ${duration(m.eta_s)}` : "",
    ] : h("span", { class: "muted", text: TERMINAL.has(job.status) ? "" : "waiting for the first step…" }));
    replace(summary, kv([
      ["Method", methodOf(job)], ["Base model", job.model], ["Training file", job.training_file],
      ["Validation file", job.validation_file], ["Created", when(job.created_at)], ["Finished", job.finished_at ? when(job.finished_at) : null],
      ["Trained tokens", job.trained_tokens], ["Adapter", job.fine_tuned_model ? h("a", { href: "#/models", text: job.fine_tuned_model }) : null],
      ["Error", job.error ? `${job.error.code}: ${job.error.message}` : null],
    ]));
    replace(hp, h("h2", { text: "Hyperparameters (resolved)" }), hyperparameters(job));
    const ckpts = (await get(`/v1/fine_tuning/jobs/${jobId}/checkpoints`, { limit: 100 })).data;
    replace(checkpoints, h("h2", { text: "Checkpoints" }), ckpts.length ? table([
      ["Step", (c) => c.step_number], ["Created", (c) => when(c.created_at)],
      ["Metrics", (c) => Object.entries(c.metrics).map(([k, v]) => `${k}=${typeof v === "number" ? v.toPrecision(4) : v}`).join(" ")],
    ], ckpts) : h("p", { class: "muted", text: "None yet." }));
    if (TERMINAL.has(job.status)) stop();
  }

  // one refresh at a time: two would read the same events page twice
  let chain = Promise.resolve();
  const serial = () => (chain = chain.then(refresh, refresh));
  const stopPolling = every(1500, async () => {
    if (stopped) return;
    try {
      await serial();
    } catch (exc) {
      if (exc.status === 404) stop(); // missing, or another tenant's: the same answer, nothing to poll
      throw exc;
    }
  });
  function stop() {
    stopped = true;
    stopPolling();
  }
  return () => { stop(); chart.destroy(); };
}
