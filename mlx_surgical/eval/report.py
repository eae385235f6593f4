"""The evaluation report: eval.json (everything), eval.md (for people) and the console table,
all drawn from the same rows, and the one-line trade of what was learned against what was
disturbed."""

from pathlib import Path
from typing import Optional

from ..files import make_directory, write_json_atomic, write_text_atomic
from ..rundir import RunDir


def _change(base: Optional[float], adapted: Optional[float]) -> Optional[float]:
    return None if base is None or adapted is None else adapted - base


def pass_k_values(samples: int) -> list[int]:
    """The k of the pass@k figures reported for `samples` candidates a problem."""
    return [1] + ([samples] if samples > 1 else [])


def _pass_keys(works: dict) -> list[str]:
    return [f"pass@{k}" for k in pass_k_values(works["samples"])]


def figure_rows(report: dict) -> list[tuple[str, Optional[float], Optional[float], Optional[float]]]:
    """(figure, base, adapted, adapted - base) for the table in every output."""
    learned, reference, kl = report["learned"], report["disturbed"]["reference"], report["disturbed"]["kl"]
    rows = [("held-out loss", learned["base"]["loss"], learned["adapted"]["loss"], -learned["gain"]),
            ("held-out perplexity", learned["base"]["perplexity"], learned["adapted"]["perplexity"], None)]
    for kind, figures in reference["by_kind"].items():
        rows.append((f"reference loss, {kind}", figures["base"]["loss"], figures["adapted"]["loss"],
                     figures["adapted"]["loss"] - figures["base"]["loss"]))
    rows.append(("reference loss", reference["base"]["loss"], reference["adapted"]["loss"], reference["change"]))
    rows.append(("KL(base || adapted), nats/token", None, kl["mean"], None))
    works = report["works"]
    if works:
        for key in _pass_keys(works):
            rows.append((key, works["base"][key], works["adapted"][key], works["adapted"][key] - works["base"][key]))
    return rows


def _number(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def trade_line(report: dict) -> str:
    """What was learned against what was disturbed, in one line."""
    learned, disturbed, works = report["learned"], report["disturbed"], report["works"]
    line = (f"learned {-learned['gain']:+.4f} held-out loss (perplexity {learned['base']['perplexity']:.2f} -> "
            f"{learned['adapted']['perplexity']:.2f}) | disturbed {disturbed['reference']['change']:+.4f} "
            f"reference loss, KL {disturbed['kl']['mean']:.4f} nats/token")
    if works:
        line += f" | pass@1 {works['base']['pass@1']:.3f} -> {works['adapted']['pass@1']:.3f}"
    return line


def summary(report: dict) -> dict:
    """The headline figures the registry shows beside an adapter."""
    works = report["works"]
    return {"created": report["created"], "data": report["data"]["source"], "line": trade_line(report),
            "held_out_loss": {"base": report["learned"]["base"]["loss"],
                              "adapted": report["learned"]["adapted"]["loss"]},
            "reference_loss": {"base": report["disturbed"]["reference"]["base"]["loss"],
                               "adapted": report["disturbed"]["reference"]["adapted"]["loss"]},
            "kl": report["disturbed"]["kl"]["mean"],
            "pass": {k: {"base": works["base"][k], "adapted": works["adapted"][k]} for k in _pass_keys(works)}
            if works else None}


def _concept_rows(report: dict) -> list[list[str]]:
    rows = []
    for concept, figures in report["concepts"].items():
        learned, works = figures["learned"], figures["works"]
        row = [concept, str(figures["examples"]),
               _number(learned["base"]["loss"]) if learned else "-",
               _number(learned["adapted"]["loss"]) if learned else "-",
               _number(_change(learned["base"]["loss"], learned["adapted"]["loss"]), True) if learned else "-"]
        if report["works"]:
            row += [f"{works['base'][k]:.3f} -> {works['adapted'][k]:.3f}" if works else "-"
                    for k in _pass_keys(report["works"])]
        rows.append(row)
    return rows


def _concept_header(report: dict) -> list[str]:
    return ["concept", "examples", "loss base", "loss adapted", "change"] + (
        _pass_keys(report["works"]) if report["works"] else [])


def format_table(report: dict) -> str:
    """The console table."""
    lines = [f"{'':<34}{'base':>12}{'adapted':>12}{'change':>12}"]
    for name, base, adapted, change in figure_rows(report):
        lines.append(f"{name:<34}{_number(base):>12}{_number(adapted):>12}{_number(change, True):>12}")
    if report["concepts"]:
        header = _concept_header(report)
        rows = [header] + _concept_rows(report)
        widths = [max(len(r[i]) for r in rows) + 2 for i in range(len(header))]
        lines.append("")
        lines += ["".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                  for r in rows]
    lines += ["", trade_line(report)]
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(report: dict) -> str:
    data = report["data"]
    lines = [f"# Evaluation of {report['adapter']}", "",
             f"Base model `{report['base_model']}`; held-out data: {data['source']} ({data['scored']} of "
             f"{data['examples']} examples scored); {report['created']}.", "", f"**{trade_line(report)}**", ""]
    lines += _md_table(["figure", "base", "adapted", "change"],
                       [[n, _number(b), _number(a), _number(c, True)] for n, b, a, c in figure_rows(report)])
    lines += ["", "Held-out loss: mean cross-entropy per answer token (the training loss). Reference loss: every token "
              "of the prose and code shipped with mlx_surgical. KL: mean over the answer tokens of neutral "
              "questions; 0 means the adapter changed nothing there."]
    if report["concepts"]:
        lines += ["", "## Per concept", ""] + _md_table(_concept_header(report), _concept_rows(report))
    works = report["works"]
    if works:
        lines += ["", "## Works", "",
                  f"{works['problems']} problems, {works['samples']} candidate(s) each "
                  f"({'greedy' if works['samples'] == 1 else 'temperature ' + str(report['settings']['temperature'])}),"
                  " run with their tests in the sandbox; pass@k by the unbiased estimator of Chen et al. (2021).", ""]
        rows = [[b["origin"], f"{b['passed']}/{b['samples']}", f"{a['passed']}/{a['samples']}",
                 ", ".join(sorted(set(a["statuses"])))] for b, a in zip(works["problems_detail"]["base"],
                                                                       works["problems_detail"]["adapted"])]
        lines += _md_table(["problem", "base passed", "adapted passed", "adapted outcomes"], rows)
    if report["generations"]:
        lines += ["", "## Side by side", ""]
        for g in report["generations"]:
            lines += [f"**{g['origin']}**", "", "> " + g["prompt"].replace("\n", "\n> "), "",
                      "Base:", "", "~~~~", g["base"], "~~~~", "", "Adapted:", "", "~~~~", g["adapted"], "~~~~", ""]
    sandbox = report["sandbox"]
    if sandbox:
        lines += ["", f"## Sandbox ({sandbox['isolation']})", "", "Enforced:", ""]
        lines += [f"- {item}" for item in sandbox["enforced"]] + ["", "Not prevented:", ""]
        lines += [f"- {item}" for item in sandbox["not_enforced"]]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, report: dict) -> RunDir:
    """eval.json and eval.md, named as in a run directory."""
    out = RunDir(make_directory(out_dir))
    write_json_atomic(out.eval_json, report)
    write_text_atomic(out.eval_md, markdown(report))
    return out
