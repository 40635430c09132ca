// The loss curve: train loss per step, eval loss per eval, learning rate on its own axis.
// uPlot (vendored, see static/vendor/uplot) draws on a canvas; the points it holds stay
// readable on the element (el.chart.data) for the browser tests and for debugging.
/* global uPlot */

function size(el) {
  return { width: Math.max(280, el.clientWidth || 600), height: 280 };
}

export function lossChart(el) {
  const points = new Map(); // step -> {train_loss, eval_loss, learning_rate}
  const opts = {
    ...size(el),
    scales: { x: { time: false }, lr: { auto: true } },
    axes: [{ label: "step" }, { label: "loss" }, { scale: "lr", side: 1, label: "learning rate", size: 70,
      values: (u, ticks) => ticks.map((t) => t.toExponential(1)) }],
    series: [{ label: "step" },
      { label: "train loss", stroke: "#2563eb", width: 2 },
      { label: "eval loss", stroke: "#dc2626", width: 2, spanGaps: true, points: { show: true, size: 6 } },
      { label: "learning rate", stroke: "#16a34a", scale: "lr", dash: [4, 4] }],
  };
  const chart = new uPlot(opts, [[], [], [], []], el);
  el.chart = chart;
  const resize = () => chart.setSize(size(el));
  window.addEventListener("resize", resize);
  return {
    add(data) {
      if (typeof data?.step !== "number") return;
      const row = points.get(data.step) || {};
      for (const key of ["train_loss", "eval_loss", "learning_rate"]) if (typeof data[key] === "number") row[key] = data[key];
      points.set(data.step, row);
    },
    draw() {
      const steps = [...points.keys()].sort((a, b) => a - b);
      const col = (k) => steps.map((s) => points.get(s)[k] ?? null);
      chart.setData([steps, col("train_loss"), col("eval_loss"), col("learning_rate")]);
    },
    destroy() {
      window.removeEventListener("resize", resize);
      chart.destroy();
    },
  };
}
