// New run: a preset, data (the bundled sample, an uploaded file or pasted examples) and the
// common fields; Validate shows the server's problems beside the fields they name, Start
// queues the job and opens its page. Defaults and help texts come from the server's config.

import { api, ApiError } from "./api.js";
import { fill, h, problemList } from "./util.js";

// The common fields, by config key; every other setting keeps the preset's value.
const FIELDS = [
  ["Run", [["output.name", "Run name", "text"], ["model.path", "Model", "text"], ["model.dtype", "Compute dtype", "select"]]],
  ["LoRA", [["lora.rank", "Rank", "number"], ["lora.alpha", "Alpha", "number"], ["lora.dropout", "Dropout", "number"],
    ["lora.layers", "Layers ('all' or the last N)", "text"], ["lora.target_modules", "Projections", "checks"]]],
  ["Training", [["training.length", "Length", "length"], ["training.learning_rate", "Learning rate", "number"],
    ["training.warmup_steps", "Warmup updates", "number"], ["training.batch_size", "Batch size", "number"],
    ["training.grad_accumulation_steps", "Accumulation steps", "number"],
    ["training.max_seq_length", "Max sequence length", "number"], ["training.save_every", "Checkpoint every", "number"],
    ["training.eval_every", "Validate every", "number"]]],
];
// Problems naming these keys are shown beside the field that sets them.
const ALIASES = { "training.iters": "training.length", "training.epochs": "training.length", "training": "training.length" };

export async function newRunView(main, { signal }) {
  const [presets, settings] = await Promise.all([api.get("/api/presets", signal), api.get("/api/config/settings", signal)]);
  const presetSelect = h("select#preset", { name: "preset" },
    presets.map((p) => h("option", { value: p.name }, p.name)));
  presetSelect.value = presets.some((p) => p.name === "tiny") ? "tiny" : presets[0]?.name;
  const presetText = h("p.muted#preset-description");
  const general = h("div#general-problems");
  const notes = h("div#notes");
  const form = h("form.new-run#new-run-form", { novalidate: true },
    h("section.card",
      h("div.field", h("label", { for: "preset" }, "Preset"), presetSelect, presetText),
      general),
    dataSection(),
    FIELDS.map(([title, fields]) => h("section.card", h("h3", title),
      h("div.grid", fields.map(([key, label, kind]) => field(key, label, kind, settings))))),
    h("section.card.buttons",
      h("button#validate", { type: "button", on: { click: () => submit("validate") } }, "Validate"),
      h("button.primary#start", { type: "submit" }, "Start"),
      notes));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit("start");
  });
  fill(main, h("h2", "New run"), form);

  function applyPreset() {
    const preset = presets.find((p) => p.name === presetSelect.value);
    presetText.textContent = preset?.config.description || "";
    for (const [, fields] of FIELDS) {
      for (const [key, , kind] of fields) setValue(form, key, kind, preset?.config || {}, settings);
    }
    clearProblems();
  }
  presetSelect.addEventListener("change", applyPreset);
  applyPreset();

  function clearProblems() {
    fill(general);
    fill(notes);
    form.querySelectorAll(".field-problems").forEach((el) => fill(el));
    form.querySelectorAll(".has-problem").forEach((el) => el.classList.remove("has-problem"));
  }

  function showProblems(problems, where = null) {
    const left = [];
    for (const problem of problems) {
      const key = where || fieldKey(problem);
      const box = key && form.querySelector(`[data-field="${key}"] .field-problems`);
      if (box) {
        box.append(h("li", problem));
        box.closest(".field").classList.add("has-problem");
      } else {
        left.push(problem);
      }
    }
    if (left.length) fill(general, problemList(left));
    form.querySelector(".has-problem input, .has-problem textarea, .has-problem select")?.focus();
  }

  async function submit(action) {
    clearProblems();
    const preset = presets.find((p) => p.name === presetSelect.value);
    const config = await buildConfig(form, preset?.config || {}, showProblems);
    if (!config) return;
    form.classList.add("busy");
    try {
      if (action === "validate") {
        const result = await api.post("/api/training/validate", config);
        fill(notes, h("div.ok", h("strong", `Valid: it would train as run '${result.run_name}'.`),
          h("ul", result.notes.map((n) => h("li", n)))));
      } else {
        const job = await api.post("/api/training/start", config);
        location.hash = `#/run/${encodeURIComponent(job.run_name)}`;
      }
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      showProblems(e.problems);
    } finally {
      form.classList.remove("busy");
    }
  }
}

function fieldKey(problem) {
  const match = /\b((?:model|lora|data|training|output)(?:\.[a-z_]+)?)/.exec(problem.replace(/^config: /, ""));
  if (!match) return null;
  const key = match[1];
  if (key.startsWith("data")) return key.startsWith("data.valid") ? "data.valid" : "data.train";
  return ALIASES[key] || key;
}

function dataSection() {
  const source = (name, options) => h("div.sources", options.map(([value, label], i) =>
    h("label.check", h("input", { type: "radio", name, value, checked: i === 0 }), label)));
  const section = h("section.card", { on: { change: () => showSources(section) } }, h("h3", "Data"),
    h("div.field", { dataset: { field: "data.train" } },
      h("label", "Training examples"),
      source("train-source", [["bundled", "bundled sample (code instruction pairs)"], ["upload", "upload a file"],
        ["paste", "paste examples"]]),
      h("input#train-file", { type: "file", accept: ".jsonl,.json" }),
      h("textarea#train-paste", { rows: 6, spellcheck: "false",
        placeholder: '{"instruction": "Write a function that ...", "response": "def f(): ..."}\none example a line (JSONL), or a JSON list' }),
      h("p.help", "JSONL (one example a line) or JSON (a list). Each example: instruction/response, " +
        "instruction/input/output, prompt/completion, messages, or text."),
      h("ul.field-problems")),
    h("div.field", { dataset: { field: "data.valid" } },
      h("label", "Validation examples"),
      source("valid-source", [["bundled", "bundled sample"], ["upload", "upload a file"], ["none", "none"]]),
      h("input#valid-file", { type: "file", accept: ".jsonl,.json" }),
      h("ul.field-problems")));
  showSources(section);
  return section;
}

// Only the input of the chosen source is shown.
function showSources(section) {
  for (const split of ["train", "valid"]) {
    const chosen = section.querySelector(`input[name="${split}-source"]:checked`).value;
    section.querySelector(`#${split}-file`).hidden = chosen !== "upload";
    const paste = section.querySelector(`#${split}-paste`);
    if (paste) paste.hidden = chosen !== "paste";
  }
}

function field(key, label, kind, settings) {
  const [section, name] = key.split(".");
  const setting = settings[section]?.[name] ?? {};
  const id = `field-${key.replace(".", "-")}`;
  let input;
  if (kind === "select") {
    input = h(`select#${id}`, { name: key }, setting.choices.map((c) => h("option", { value: c }, c)));
  } else if (kind === "checks") {
    input = h(`div.checks#${id}`, setting.choices.map((c) =>
      h("label.check", h("input", { type: "checkbox", name: key, value: c }), c)));
  } else if (kind === "length") {
    input = h("div.length",
      h("input#field-training-length", { type: "number", min: 1, step: 1, name: key }),
      h("select#field-training-unit", { name: "training.unit", "aria-label": "unit" },
        h("option", { value: "epochs" }, "epochs"), h("option", { value: "iters" }, "optimizer updates")));
  } else {
    input = h(`input#${id}`, { name: key, type: kind, step: kind === "number" ? "any" : null });
  }
  const help = kind === "length" ? `${settings.training.epochs.help} ${settings.training.iters.help}` : setting.help;
  return h("div.field", { dataset: { field: key } },
    h("label", { for: kind === "length" ? "field-training-length" : id, title: key }, label),
    input, h("p.help", help), h("ul.field-problems"));
}

function lookup(config, key) {
  const [section, name] = key.split(".");
  return config[section]?.[name];
}

function setValue(form, key, kind, config, settings) {
  const [section, name] = key.split(".");
  if (kind === "length") {
    const iters = lookup(config, "training.iters");
    form.querySelector("#field-training-unit").value = iters ? "iters" : "epochs";
    // Empty when the config sets neither: the config's own default applies, as the help says.
    form.querySelector("#field-training-length").value = iters || lookup(config, "training.epochs") || "";
    return;
  }
  const value = lookup(config, key) ?? settings[section][name].default;
  if (kind === "checks") {
    form.querySelectorAll(`input[name="${key}"]`).forEach((box) => { box.checked = value.includes(box.value); });
  } else {
    form.querySelector(`[name="${key}"]`).value = value ?? "";
  }
}

// The preset's config with the form's values; null (and problems shown) when a field cannot be read.
async function buildConfig(form, preset, showProblems) {
  const config = JSON.parse(JSON.stringify(preset));
  const problems = [];
  const set = (key, value) => {
    const [section, name] = key.split(".");
    config[section] = config[section] || {};
    if (value === undefined) delete config[section][name];
    else config[section][name] = value;
  };
  for (const [, fields] of FIELDS) {
    for (const [key, label, kind] of fields) {
      if (kind === "checks") {
        set(key, [...form.querySelectorAll(`input[name="${key}"]:checked`)].map((box) => box.value));
      } else if (kind === "length") {
        const input = form.querySelector("#field-training-length");
        const unit = form.querySelector("#field-training-unit").value;
        set("training.epochs", undefined);
        set("training.iters", undefined);
        if (input.validity.badInput) problems.push(`training.${unit}: '${label}' is not a number`);
        else if (input.value !== "") set(`training.${unit}`, Number(input.value));
      } else {
        const input = form.querySelector(`[name="${key}"]`);
        const text = input.value.trim();
        if (input.validity?.badInput) problems.push(`${key}: '${label}' is not a number`);
        else if (text === "") set(key, undefined);
        else if (kind === "number") set(key, Number(text));
        else if (key === "lora.layers") set(key, /^\d+$/.test(text) ? Number(text) : text);
        else set(key, text);
      }
    }
  }
  if (problems.length) {
    showProblems(problems);
    return null;
  }
  config.data = config.data || {};
  for (const key of ["train", "valid", "examples", "valid_examples"]) delete config.data[key];
  const train = await dataFile(form, "train", showProblems);
  const valid = await dataFile(form, "valid", showProblems);
  if (train === null || valid === null) return null;
  config.data.train = train;
  if (valid !== undefined) config.data.valid = valid;
  return config;
}

// The data.train / data.valid value for a source: bundled, or a file uploaded into the workspace.
async function dataFile(form, split, showProblems) {
  const source = form.querySelector(`input[name="${split}-source"]:checked`).value;
  if (source === "bundled") return `bundled:${split}`;
  if (source === "none") return undefined;
  let upload;
  if (source === "paste") {
    const text = form.querySelector(`#${split}-paste`).value;
    if (!text.trim()) {
      showProblems(["paste at least one example"], `data.${split}`);
      return null;
    }
    upload = { name: text.trim().startsWith("[") ? "pasted.json" : "pasted.jsonl", text };
  } else {
    const file = form.querySelector(`#${split}-file`).files[0];
    if (!file) {
      showProblems(["choose a .jsonl or .json file"], `data.${split}`);
      return null;
    }
    // Stored under a plain name: letters, digits, '.', '_' and '-'.
    upload = { name: file.name.replace(/[^A-Za-z0-9._-]/g, "_").replace(/^\.+/, ""), text: await file.text() };
  }
  try {
    return (await api.post("/api/uploads", upload)).path;
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
    showProblems(e.problems, `data.${split}`);
    return null;
  }
}
