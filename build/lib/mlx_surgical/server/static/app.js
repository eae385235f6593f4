// The dashboard: a hash router over four views, each of which calls only the REST API.

import { adoptTokenFromUrl, ApiError, hasToken, onUnauthorized, setToken } from "./api.js";
import { adaptersView } from "./adapters.js";
import { newRunView } from "./newrun.js";
import { runView } from "./run.js";
import { runsView } from "./runs.js";
import { fill, h, problemList, refreshHealth } from "./util.js";

const views = { runs: runsView, run: runView, new: newRunView, adapters: adaptersView };
const main = document.getElementById("view");
let current = null; // the shown view's AbortController: leaving a view closes its streams and timers

async function show() {
  const [, name = "runs", ...rest] = location.hash.split("/");
  const view = views[name] || views.runs;
  current?.abort();
  current = new AbortController();
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === name));
  fill(main);
  refreshHealth();
  try {
    await view(main, { signal: current.signal, arg: decodeURIComponent(rest.join("/")) });
  } catch (e) {
    if (e.name === "AbortError") return;
    fill(main, h("section.card", h("h2", e.status === 401 ? "Token needed" : "Something went wrong"),
      problemList(e instanceof ApiError ? e.problems : [String(e.message || e)])));
  }
}

const tokenForm = document.getElementById("token-form");
onUnauthorized(() => {
  tokenForm.hidden = false;
  document.getElementById("token-problem").textContent = hasToken() ? "that token was refused" : "";
  document.getElementById("token-input").focus();
});
tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  setToken(document.getElementById("token-input").value.trim());
  tokenForm.hidden = true;
  show();
});

adoptTokenFromUrl();
window.addEventListener("hashchange", show);
show();
