// The REST API as the dashboard uses it: the token from session storage as an Authorization
// header (never a cookie), problems as thrown ApiErrors, server-sent events read with fetch
// (EventSource cannot send headers), downloads fetched as blobs for the same reason.

const TOKEN_KEY = "mlx-surgical-token";

export class ApiError extends Error {
  constructor(status, problems) {
    super(problems.join("\n"));
    this.status = status;
    this.problems = problems;
  }
}

// A token in the start-up URL (?token=...) moves to session storage and leaves the address bar.
export function adoptTokenFromUrl() {
  const url = new URL(location.href);
  const token = url.searchParams.get("token");
  if (token === null) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  url.searchParams.delete("token");
  history.replaceState(null, "", url.pathname + url.search + url.hash);
}

export function hasToken() {
  return sessionStorage.getItem(TOKEN_KEY) !== null;
}

export function setToken(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
}

const listeners = { unauthorized: [] };
export function onUnauthorized(fn) {
  listeners.unauthorized.push(fn);
}

function headers(extra = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function failure(response) {
  let problems;
  try {
    problems = (await response.json()).problems;
  } catch {
    problems = null;
  }
  if (!Array.isArray(problems) || !problems.length) {
    problems = [`the server answered ${response.status} ${response.statusText || ""}`.trim()];
  }
  if (response.status === 401) listeners.unauthorized.forEach((fn) => fn(problems));
  return new ApiError(response.status, problems);
}

async function send(method, path, body, signal) {
  const init = { method, headers: headers(), signal };
  if (body !== undefined) {
    init.headers = headers({ "Content-Type": "application/json" });
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, ["the server cannot be reached; is `mlx-surgical serve` still running?"]);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

export const api = {
  get: async (path, signal) => (await send("GET", path, undefined, signal)).json(),
  post: async (path, body) => (await send("POST", path, body)).json(),
  del: async (path) => (await send("DELETE", path)).json(),
};

// Reads `/events` until the job ends or `signal` aborts; calls onEvent(type, data) per event.
export async function streamEvents(path, onEvent, signal) {
  const response = await send("GET", path, undefined, signal);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let type = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) type = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(type, JSON.parse(data));
    }
  }
}

// Saves a response body as a file, named as the server's Content-Disposition says.
export async function download(path) {
  const response = await send("GET", path);
  const blob = await response.blob();
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = /filename="?([^";]+)"?/.exec(disposition);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = match ? match[1] : "download";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  return link.download;
}
