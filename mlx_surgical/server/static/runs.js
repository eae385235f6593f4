// Runs: every job and every run in the workspace. The row of the running job (or, when none
// runs, of the next queued one) follows its event stream; the whole list is read again when
// that job ends and every 15 s while the tab is shown.

import { api, streamEvents } from "./api.js";
import { ACTIVE, duration, fill, fixed, h, integer, progressBar, refreshHealth, stateBadge, tableCard, when } from "./util.js";

const REFRESH_MS = 15_000;
const JOBS_PAGE = 100;

// Every job the server keeps (serve.keep_jobs may exceed a page), newest first.
async function allJobs(signal) {
  const jobs = [];
  for (let page = null; page === null || page.length === JOBS_PAGE; ) {
    page = await api.get(`/api/training/jobs?offset=${jobs.length}&limit=${JOBS_PAGE}`, signal);
    jobs.push(...page);
  }
  return jobs;
}

// One row per run name: its latest job, else the run found in adapters/ (trained by the CLI).
export async function listRuns(signal) {
  const [jobs, adapters] = await Promise.all([allJobs(signal), api.get("/api/adapters", signal)]);
  const rows = new Map();
  jobs.reverse(); // the API lists the newest first: walk oldest first, so a run's latest job wins
  jobs.forEach((job, queuePosition) => rows.set(job.run_name, { name: job.run_name, job, adapter: null, queuePosition }));
  for (const adapter of adapters) {
    const row = rows.get(adapter.name) || { name: adapter.name, job: null };
    row.adapter = adapter;
    rows.set(adapter.name, row);
  }
  return [...rows.values()].sort((a, b) => created(b).localeCompare(created(a)));
}

function created(row) {
  return row.job?.created || row.adapter?.created || "";
}

export async function runsView(main, { signal }) {
  const empty = h("p.muted", "No runs yet: start one from ", h("a", { href: "#/new" }, "New run"), ".");
  const body = tableCard(main, "Runs", "table.runs#runs-table",
    ["Run", "State", "Progress", "Loss", "Val loss", "Tokens/s", "ETA", "Created"], empty);

  let following = null; // the job id whose events update its row
  const rowsByJob = new Map();

  async function load() {
    const runs = await listRuns(signal);
    rowsByJob.clear();
    fill(body, runs.map((run) => {
      const tr = h("tr", { dataset: { run: run.name } });
      renderRow(tr, run);
      if (run.job) rowsByJob.set(run.job.id, { tr, run });
      return tr;
    }));
    empty.hidden = runs.length > 0;
    const next = runs.find((run) => run.job?.state === "running")
      || runs.filter((run) => run.job?.state === "queued").sort((a, b) => a.queuePosition - b.queuePosition)[0];
    if (next && next.job.id !== following) follow(next.job.id);
  }

  function follow(jobId) {
    following = jobId;
    streamEvents(`/api/training/jobs/${jobId}/events`, (type, data) => {
      const entry = rowsByJob.get(jobId);
      if (!entry) return;
      if (type === "state") Object.assign(entry.run.job, data);
      else if (data.type === "progress") Object.assign(entry.run.job, data, { state: "running" });
      else if (data.type === "validation") entry.run.job.val_loss = data.val_loss;
      renderRow(entry.tr, entry.run);
    }, signal).catch(() => {}).finally(() => {
      if (following === jobId) following = null;
      if (!signal.aborted) load().catch(() => {});
      refreshHealth();
    });
  }

  await load();
  const timer = setInterval(() => {
    if (!document.hidden) load().catch(() => {});
  }, REFRESH_MS);
  signal.addEventListener("abort", () => clearInterval(timer));
}

function renderRow(tr, { name, job, adapter }) {
  const state = job ? job.state : adapter.status;
  fill(tr,
    h("td", h("a", { href: `#/run/${encodeURIComponent(name)}` }, name)),
    h("td", stateBadge(state), job?.error ? h("div.error-text", job.error) : null),
    h("td", job ? progressBar(job.update, job.total_updates) : ""),
    h("td.num", fixed(job?.loss)),
    h("td.num", fixed(job ? job.val_loss : adapter.final_val_loss)),
    h("td.num", integer(job?.tokens_per_second)),
    h("td.num", job && ACTIVE.includes(job.state) ? duration(job.eta_seconds) : ""),
    h("td", when(job?.created || adapter?.created)));
}
