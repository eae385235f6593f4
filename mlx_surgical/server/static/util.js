// Small DOM and formatting helpers shared by the views, and the server status in the header.

import { api } from "./api.js";

// h("div.card#id", {attrs, on: {click}}, ...children): an element; strings become text, never HTML.
export function h(tag, props = {}, ...children) {
  if (typeof props !== "object" || props === null || props instanceof Node || Array.isArray(props)) {
    children.unshift(props);
    props = {};
  }
  const [, name, rest] = /^([a-z0-9]+)(.*)$/i.exec(tag);
  const el = document.createElement(name);
  for (const part of rest.match(/[.#][^.#]+/g) || []) {
    if (part[0] === ".") el.classList.add(part.slice(1));
    else el.id = part.slice(1);
  }
  for (const [key, value] of Object.entries(props)) {
    if (key === "on") Object.entries(value).forEach(([event, fn]) => el.addEventListener(event, fn));
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(key, "");
    else if (value !== false && value !== null && value !== undefined) el.setAttribute(key, value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

/** A card holding a titled table; rows go into the returned tbody, `empty` shows when there are none. */
export function tableCard(main, title, tableSelector, headers, empty) {
  const body = h("tbody");
  fill(main, h("section.card",
    h("h2", title),
    h(tableSelector, h("thead", h("tr", headers.map((t) => h("th", t)))), body),
    empty));
  return body;
}

export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// A list of problems from the server (or the page), one line each.
export function problemList(problems) {
  return h("ul.problems", problems.map((p) => h("li", p)));
}

export function fixed(value, digits = 4) {
  return value === null || value === undefined ? "" : Number(value).toFixed(digits);
}

export function integer(value) {
  return value === null || value === undefined ? "" : Math.round(value).toLocaleString("en-US");
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.max(0, Math.round(seconds));
  const parts = [Math.floor(s / 3600), Math.floor((s % 3600) / 60), s % 60];
  return parts[0] ? `${parts[0]}h ${parts[1]}m` : parts[1] ? `${parts[1]}m ${parts[2]}s` : `${parts[2]}s`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "kB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

export const ACTIVE = ["queued", "running"];

// The state shown for a job: its own, with progress for a running one.
export function stateBadge(state) {
  return h(`span.badge.state-${state || "unknown"}`, state || "unknown");
}

export function progressBar(update, total) {
  const share = total ? Math.min(1, update / total) : 0;
  const bar = h("div.progress", { title: total ? `${update} of ${total} updates` : "" },
    h("div.progress-fill"), h("span.progress-label", total ? `${update} / ${total}` : ""));
  bar.firstChild.style.width = `${(100 * share).toFixed(1)}%`;
  return bar;
}

export async function refreshHealth() {
  const el = document.getElementById("health");
  try {
    const health = await api.get("/api/health");
    el.textContent = health.version ? `${health.status} · v${health.version} · ${health.backend}` : health.status;
    el.title = health.workspace ? `workspace ${health.workspace}` : "server status";
    el.className = `health health-${health.status}`;
  } catch {
    el.textContent = "unreachable";
    el.className = "health health-down";
  }
}
