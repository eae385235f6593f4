// Adapters: the registry of run directories, with verify and delete (after confirmation).

import { api, ApiError } from "./api.js";
import { bytes, fill, fixed, h, integer, problemList, stateBadge, tableCard, when } from "./util.js";

export async function adaptersView(main, { signal }) {
  const empty = h("p.muted", "No adapters yet.");
  const body = tableCard(main, "Adapters", "table.adapters#adapters-table",
    ["Name", "Status", "Base model", "Trainable", "Size", "Best val loss", "Created", ""], empty);

  async function load() {
    const adapters = await api.get("/api/adapters", signal);
    fill(body, adapters.map(row));
    empty.hidden = adapters.length > 0;
  }

  function row(adapter) {
    const name = adapter.name;
    const path = `/api/adapters/${encodeURIComponent(name)}`;
    const actions = h("td.actions");
    const result = h("td", { colspan: 8 });
    const resultRow = h("tr.result", { hidden: true, dataset: { result: name } }, result);

    function showResult(...children) {
      fill(result, ...children);
      resultRow.hidden = false;
    }

    async function verify(button) {
      button.disabled = true;
      try {
        const { checked } = await api.post(`${path}/verify`);
        showResult(h("div.ok", h("strong", `${name}: ok`), h("ul", checked.map((line) => h("li", line)))));
      } catch (e) {
        if (!(e instanceof ApiError)) throw e;
        showResult(h("strong", `${name}: verification failed`), problemList(e.problems));
      } finally {
        button.disabled = false;
      }
    }

    function askDelete() {
      fill(actions, h("span.confirm", `Delete ${name} and all its files?`),
        h("button.danger.confirm-delete", { on: { click: remove } }, "Delete"),
        h("button", { on: { click: restore } }, "Cancel"));
    }

    async function remove() {
      try {
        await api.del(path);
        await load();
      } catch (e) {
        if (!(e instanceof ApiError)) throw e;
        restore();
        showResult(problemList(e.problems));
      }
    }

    function restore() {
      fill(actions,
        h("button.verify", { on: { click: (event) => verify(event.currentTarget) } }, "Verify"),
        h("button.delete", { on: { click: askDelete } }, "Delete…"));
    }

    restore();
    const tr = h("tr", { dataset: { adapter: name } },
      h("td", h("a", { href: `#/run/${encodeURIComponent(name)}` }, name)),
      h("td", stateBadge(adapter.status)),
      h("td.path", adapter.base_model),
      h("td.num", integer(adapter.trainable_parameters)),
      h("td.num", bytes(adapter.size_bytes)),
      h("td.num", fixed(adapter.best_val_loss)),
      h("td", when(adapter.created)),
      actions);
    return [tr, resultRow];
  }

  await load();
}
