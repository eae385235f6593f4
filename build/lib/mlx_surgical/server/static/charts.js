// Loss and learning-rate charts (uPlot) for one run and any runs overlaid on it.
// A run's points are kept by update number, so replayed or repeated events (after a resume)
// replace points instead of adding them.

const UPDATE_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000];
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#4b5563"];

export class RunSeries {
  constructor(name) {
    this.name = name;
    this.points = new Map(); // update -> {loss, learning_rate, val_loss}
  }

  add(update, values) {
    this.points.set(update, { ...this.points.get(update), ...values });
  }

  // Rows of metrics.jsonl: one per update (loss, learning_rate) and one per evaluation (val_loss).
  addMetrics(rows) {
    for (const row of rows) {
      const values = {};
      for (const key of ["loss", "learning_rate", "val_loss"]) if (row[key] !== undefined) values[key] = row[key];
      this.add(row.update, values);
    }
  }

  // Events of the job's stream: "progress" and "validation".
  addEvent(event) {
    if (event.type === "progress") this.add(event.update, { loss: event.loss, learning_rate: event.learning_rate });
    else if (event.type === "validation" && event.val_loss !== null) this.add(event.update, { val_loss: event.val_loss });
  }

  get trainingPoints() {
    let count = 0;
    for (const p of this.points.values()) if (p.loss !== undefined) count += 1;
    return count;
  }

  table(keys) {
    const updates = [...this.points.keys()].sort((a, b) => a - b);
    return [updates, ...keys.map((key) => updates.map((u) => this.points.get(u)[key] ?? null))];
  }
}

class Chart {
  constructor(container, title, yLabel, keys) {
    this.container = container;
    this.title = title;
    this.yLabel = yLabel;
    this.keys = keys; // [{key, label, dash}]
    this.plot = null;
    this.shape = "";
  }

  render(runs) {
    const tables = runs.map((run) => run.table(this.keys.map((k) => k.key)));
    const data = uPlot.join(tables);
    const series = [{ label: "update" }];
    runs.forEach((run, i) => {
      for (const k of this.keys) {
        series.push({
          label: runs.length > 1 ? `${run.name} ${k.label}` : k.label,
          stroke: COLORS[i % COLORS.length],
          dash: k.dash,
          width: 2,
          spanGaps: true,
          points: { show: k.dash !== undefined },
        });
      }
    });
    const shape = series.map((s) => s.label).join("|");
    const width = Math.max(300, this.container.clientWidth - 8);
    if (this.plot && shape === this.shape) {
      this.plot.setData(data);
      if (Math.abs(this.plot.width - width) > 4) this.plot.setSize({ width, height: 260 });
      return;
    }
    this.plot?.destroy();
    this.shape = shape;
    this.plot = new uPlot({
      title: this.title,
      width,
      height: 260,
      scales: { x: { time: false } },
      axes: [{ label: "optimizer update", incrs: UPDATE_STEPS }, { label: this.yLabel, size: 70 }],
      series,
    }, data, this.container);
  }
}

export function lossChart(container) {
  return new Chart(container, "Loss", "loss", [
    { key: "loss", label: "training loss" },
    { key: "val_loss", label: "validation loss", dash: [6, 4] },
  ]);
}

export function learningRateChart(container) {
  return new Chart(container, "Learning rate", "learning rate", [{ key: "learning_rate", label: "learning rate" }]);
}
