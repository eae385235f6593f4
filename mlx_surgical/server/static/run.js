// A run: live loss and learning-rate charts (other runs overlaid on request), stop and resume,
// downloads, the evaluation report, the plan figures, the resolved config and the event log.

import { api, ApiError, download, streamEvents } from "./api.js";
import { learningRateChart, lossChart, RunSeries } from "./charts.js";
import { listRuns } from "./runs.js";
import { ACTIVE, bytes, duration, fill, fixed, h, integer, problemList, progressBar, refreshHealth, stateBadge }
  from "./util.js";

const FORMATS = ["mlx", "peft", "gguf"];
const LOG_LINES = 400;

export async function runView(main, { signal, arg: name }) {
  const runs = await listRuns(signal);
  const run = runs.find((r) => r.name === name);
  if (!run) {
    fill(main, h("section.card", h("h2", name), problemList([`no run or job named '${name}' in this workspace`])));
    return;
  }
  let job = run.job;
  const series = new RunSeries(name);
  const overlays = new Map(); // name -> RunSeries

  const status = h("div.status");
  const actions = h("div.actions");
  const message = h("div.message");
  const lossBox = h("div.chart#loss-chart");
  const lrBox = h("div.chart#lr-chart");
  const chartCaption = h("p.muted#chart-caption");
  const compare = h("div.compare");
  const downloads = h("div.downloads");
  const evalBox = h("div");
  const planBox = h("div");
  const configBox = h("pre.config");
  const log = h("pre.log#event-log");
  const charts = { loss: lossChart(lossBox), lr: learningRateChart(lrBox) };

  fill(main,
    h("section.card",
      h("div.title-row", h("h2", name), actions),
      status, message),
    h("section.card",
      h("h3", "Training"),
      lossBox, lrBox, chartCaption,
      h("details", { on: { toggle: (event) => event.target.open && loadCompare() } },
        h("summary", "Compare with other runs"), compare)),
    h("div.columns",
      h("section.card", h("h3", "Download"), downloads, evalBox),
      h("section.card", h("h3", "Plan"), planBox)),
    h("section.card", h("h3", "Resolved config"), configBox),
    h("section.card", h("h3", "Events"), log));

  let frame = 0;
  function redraw() {
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      const shown = [series, ...overlays.values()];
      const points = series.trainingPoints;
      lossBox.dataset.points = String(points);
      if ([...series.points.keys()].length || overlays.size) {
        charts.loss.render(shown);
        charts.lr.render(shown);
      }
      const total = job?.total_updates;
      chartCaption.textContent = points
        ? `${points} update${points === 1 ? "" : "s"} plotted${total ? ` of ${total}` : ""}`
        : "no updates yet";
    });
  }

  function logLine(text) {
    const lines = (log.textContent ? log.textContent.split("\n") : []).concat(text);
    log.textContent = lines.slice(-LOG_LINES).join("\n");
    log.scrollTop = log.scrollHeight;
  }

  function renderStatus() {
    const state = job ? job.state : run.adapter.status;
    const facts = job ? [
      ["loss", fixed(job.loss)], ["validation loss", fixed(job.val_loss)],
      ["learning rate", job.learning_rate?.toExponential(2)], ["tokens/s", integer(job.tokens_per_second)],
      ["ETA", ACTIVE.includes(job.state) ? duration(job.eta_seconds) : ""],
    ] : [["final validation loss", fixed(run.adapter.final_val_loss)], ["best validation loss", fixed(run.adapter.best_val_loss)]];
    fill(status,
      h("div.status-row", stateBadge(state), job ? progressBar(job.update, job.total_updates) : null),
      h("dl.facts", facts.filter(([, v]) => v).map(([k, v]) => [h("dt", k), h("dd", v)])),
      job?.error ? problemList([job.error]) : null);
    status.dataset.state = state;
    fill(actions,
      job ? h("button#stop", { disabled: !ACTIVE.includes(job.state), on: { click: () => act("stop") } }, "Stop") : null,
      job ? h("button#resume", { disabled: !job.resumable,
        on: { click: () => act("resume") } }, "Resume") : null);
    renderDownloads();
  }

  async function act(what) {
    fill(message);
    try {
      job = await api.post(`/api/training/jobs/${job.id}/${what}`);
      logLine(what === "stop" ? "stop requested: the run saves a checkpoint and ends" : "resume queued");
      renderStatus();
      if (what === "resume") follow();
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      fill(message, problemList(e.problems));
    }
  }

  let stream = null; // a resume follows the job afresh: its stream replays every event again
  function follow() {
    stream?.abort();
    stream = new AbortController();
    signal.addEventListener("abort", () => stream.abort(), { once: true });
    log.textContent = "";
    streamEvents(`/api/training/jobs/${job.id}/events`, (type, data) => {
      if (type === "state") {
        job = data;
        renderStatus();
        setTimeout(refreshHealth, 1500); // the server is idle once it has reaped the worker
        loadRunFiles();
        return;
      }
      series.addEvent(data);
      if (data.type === "progress" && !run.adapter) loadRunFiles(); // the run directory exists from the first update
      if (data.type === "progress") {
        Object.assign(job, data, { state: "running" });
        logLine(`update ${data.update}/${data.total_updates}  loss ${fixed(data.loss)}  ` +
          `lr ${data.learning_rate.toExponential(2)}  ${integer(data.tokens_per_second)} tokens/s`);
      } else if (data.type === "validation") {
        job.val_loss = data.val_loss;
        logLine(`update ${data.update}  validation loss ${fixed(data.val_loss)}`);
      } else if (data.type === "end") {
        logLine(`ended: ${data.state}${data.error ? ` (${data.error})` : ""}`);
      }
      renderStatus();
      redraw();
    }, stream.signal).catch((e) => {
      if (e.name !== "AbortError") fill(message, problemList(e.problems || [String(e)]));
    });
  }

  function renderDownloads() {
    const ready = run.adapter && !(job && ACTIVE.includes(job.state));
    fill(downloads,
      h("p.muted", ready ? "A zip of the adapter in each consumer's format." : "Available once the run has stopped."),
      FORMATS.map((format) => h(`button.download#download-${format}`, {
        disabled: !ready,
        on: {
          click: async (event) => {
            const button = event.currentTarget;
            button.disabled = true;
            button.textContent = `${format}…`;
            try {
              await download(`/api/adapters/${encodeURIComponent(name)}/export?format=${format}`);
            } catch (e) {
              fill(message, problemList(e.problems || [String(e)]));
            } finally {
              button.disabled = false;
              button.textContent = format;
            }
          },
        },
      }, format)));
  }

  // The run directory's files: what the registry says (with any evaluation), plan and config.
  async function loadRunFiles() {
    const base = `/api/adapters/${encodeURIComponent(name)}`;
    try {
      run.adapter = await api.get(base, signal);
    } catch (e) {
      if (e.status !== 404) throw e;
      fill(planBox, h("p.muted", job && ACTIVE.includes(job.state) ? "Shown once the run has started." : "No run directory."));
      fill(configBox, "");
      return;
    }
    renderDownloads();
    renderEval(evalBox, run.adapter.eval);
    const [config, plan] = await Promise.allSettled([api.get(`${base}/config`, signal), api.get(`${base}/plan`, signal)]);
    configBox.textContent = config.status === "fulfilled" ? JSON.stringify(collapseExamples(config.value), null, 2)
      : config.reason.problems.join("\n");
    fill(planBox, plan.status === "fulfilled" ? planTable(plan.value) : problemList(plan.reason.problems));
  }

  // The runs to overlay, read when the list is opened (runs finish while the page is open).
  async function loadCompare() {
    const others = (await api.get("/api/adapters", signal)).filter((a) => a.name !== name);
    if (!others.length) {
      fill(compare, h("p.muted", "No other runs in this workspace."));
      return;
    }
    fill(compare, others.map((other) => h("label.check",
      h("input", {
        type: "checkbox", value: other.name, checked: overlays.has(other.name),
        on: {
          change: async (event) => {
            if (!event.target.checked) {
              overlays.delete(other.name);
            } else {
              const overlay = new RunSeries(other.name);
              overlay.addMetrics(await api.get(`/api/adapters/${encodeURIComponent(other.name)}/metrics`, signal));
              overlays.set(other.name, overlay);
            }
            redraw();
          },
        },
      }), other.name)));
  }

  renderStatus();
  if (job) {
    follow(); // the stream replays every event so far, then follows
  } else {
    series.addMetrics(await api.get(`/api/adapters/${encodeURIComponent(name)}/metrics`, signal));
    logLine("trained outside this server: metrics.jsonl shown, no live events");
  }
  redraw();
  window.addEventListener("resize", redraw, { signal });
  if (!job || job.state !== "queued") await loadRunFiles();
}

function collapseExamples(config) {
  const data = { ...config.data };
  for (const key of ["examples", "valid_examples"]) {
    if (Array.isArray(data[key])) data[key] = `[${data[key].length} examples inline]`;
  }
  return { ...config, data };
}

function planTable(plan) {
  const m = plan.memory;
  const s = plan.schedule;
  const rows = [
    ["model", `${plan.model.path} (${plan.model.shape})`],
    ["trainable parameters", `${integer(plan.trainable_parameters)} (${(100 * plan.trainable_share).toFixed(3)}%)`],
    ["adapter size", `${bytes(plan.adapter_size_bytes.float32)} float32, ${bytes(plan.adapter_size_bytes.float16)} float16`],
    ["memory", `${m.total_gb.toFixed(2)} GB${m.machine_gb ? ` of ${m.machine_gb.toFixed(1)} GB` : ""} ` +
      `(base ${m.base_weights_gb.toFixed(2)}, activations ${m.activations_gb.toFixed(2)})`],
    ["examples", `${s.examples} (${s.examples_counted})`],
    ["batch", `${plan.batch.global} x ${plan.batch.accumulation_steps} = ${plan.batch.examples_per_update} examples per update`],
    ["optimizer updates", `${s.updates} (${s.warmup_updates} warmup), ${Number(s.epochs.toFixed(2))} epochs`],
  ];
  return h("table.facts#plan", rows.map(([k, v]) => h("tr", h("th", k), h("td", v))));
}

// The evaluation report, when `GET /api/adapters/{name}` carries one: any nesting, as a table.
function renderEval(box, report) {
  if (!report) {
    fill(box);
    return;
  }
  const rows = [];
  (function walk(value, path) {
    if (value && typeof value === "object" && !Array.isArray(value)) {
      for (const [k, v] of Object.entries(value)) walk(v, path ? `${path}.${k}` : k);
    } else {
      rows.push([path, typeof value === "number" ? (Number.isInteger(value) ? integer(value) : fixed(value)) : JSON.stringify(value)]);
    }
  })(report, "");
  fill(box, h("h3", "Evaluation"), h("table.facts#eval", rows.map(([k, v]) => h("tr", h("th", k), h("td", v)))));
}
