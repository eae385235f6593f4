"""The surgical report on the tiny model: the figures are the ones they claim to be (held-out
loss against a plain full-logits computation, KL of a zero adapter exactly 0, pass@k against
counting subsets), files are read back by their consumers, and bad eval data is named."""

import itertools
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_surgical.cli import cli
from mlx_surgical.config import config_from_dict
from mlx_surgical.data import read_records
from mlx_surgical.errors import UserError
from mlx_surgical.eval import evaluate_adapter
from mlx_surgical.eval.disturbance import example_kl, neutral_records, reference_records
from mlx_surgical.eval.examples import extract_code, read_examples
from mlx_surgical.eval.passk import pass_at_k
from mlx_surgical.eval.sandbox import Sandbox
from mlx_surgical.model import load_model
from mlx_surgical.pipeline import train_run, validate_run
from mlx_surgical.prompt import PromptFormat, encode_records
from mlx_surgical.registry import show
from mlx_surgical.rundir import ADAPTER_FILE
from mlx_surgical.surgery import load_with_adapter

SQUARE_PROMPT = 'def square(x):\n    """Return x squared."""\n'
PROBLEMS = [
    {"instruction": "Write a Python function `add` that adds two numbers.",
     "response": "```python\ndef add(a, b):\n    return a + b\n```", "tests": ["assert add(1, 2) == 3"],
     "concept": "arithmetic"},
    {"instruction": SQUARE_PROMPT, "response": "    return x * x\n", "entry_point": "square",
     "test": "def check(candidate):\n    assert candidate(3) == 9\n", "tags": ["arithmetic", "completion"]},
    {"instruction": "Write a Python function `reverse` that reverses a list.",
     "response": "def reverse(items):\n    return items[::-1]", "tests": ["assert reverse([1, 2]) == [2, 1]"],
     "concept": "lists"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def run_copy(trained_run, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(trained_run, root / trained_run.name)
    return root / trained_run.name


@pytest.fixture(scope="module")
def report(trained_run, tmp_path_factory):
    """One full report on problems with tests and concepts: 2 sampled candidates each."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    shutil.copytree(trained_run, run_dir)
    data = write_jsonl(run_dir.parent / "problems.jsonl", PROBLEMS)
    return run_dir, data, evaluate_adapter(run_dir, data=str(data), overrides={"samples": 2, "max_tokens": 24},
                                           log=lambda _: None)


@pytest.mark.parametrize("n", range(1, 7))
def test_pass_at_k_equals_counting_every_k_subset(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


def test_report_files_and_figures(report):
    run_dir, data, result = report
    written = json.loads((run_dir / "eval.json").read_text())
    assert written == json.loads(json.dumps(result))
    learned = written["learned"]
    assert learned["base"]["tokens"] == learned["adapted"]["tokens"] > 0
    assert learned["gain"] == pytest.approx(learned["base"]["loss"] - learned["adapted"]["loss"])
    assert learned["base"]["perplexity"] == pytest.approx(np.exp(learned["base"]["loss"]))
    reference = written["disturbed"]["reference"]
    assert set(reference["by_kind"]) == {"prose", "code"} and reference["base"]["tokens"] > 2000
    assert written["disturbed"]["kl"]["mean"] > 0 and written["disturbed"]["kl"]["prompts"] == len(neutral_records())

    works = written["works"]
    assert (works["problems"], works["samples"]) == (3, 2)
    for side in ("base", "adapted"):
        detail = works["problems_detail"][side]
        assert [p["samples"] for p in detail] == [2, 2, 2]
        assert works[side]["pass@1"] == pytest.approx(np.mean([pass_at_k(2, p["passed"], 1) for p in detail]))
        assert works[side]["pass@2"] == pytest.approx(np.mean([pass_at_k(2, p["passed"], 2) for p in detail]))
    assert written["sandbox"]["isolation"] in ("namespaces", "basic") and written["sandbox"]["enforced"]

    concepts = written["concepts"]
    assert {name: c["examples"] for name, c in concepts.items()} == {"arithmetic": 2, "completion": 1, "lists": 1}
    # Every example is in a concept, and examples of one concept sum to the whole: the breakdown adds up.
    lists, arithmetic = concepts["lists"]["learned"], concepts["arithmetic"]["learned"]
    assert lists["adapted"]["tokens"] + arithmetic["adapted"]["tokens"] == learned["adapted"]["tokens"]
    total = lists["adapted"]["loss"] * lists["adapted"]["tokens"] + arithmetic["adapted"]["loss"] * arithmetic["adapted"]["tokens"]
    assert total / learned["adapted"]["tokens"] == pytest.approx(learned["adapted"]["loss"])

    assert [g["origin"] for g in written["generations"]] == [f"{data}:{i}" for i in (1, 2, 3)]
    markdown = (run_dir / "eval.md").read_text()
    assert written["summary"]["line"] in markdown and "## Per concept" in markdown and "## Sandbox" in markdown


def test_held_out_loss_equals_a_plain_full_logits_computation(report, tiny_model):
    """Base from a separately loaded base model, adapted from base + adapter: both by hand."""
    run_dir, data, result = report
    adapted = load_with_adapter(str(tiny_model), run_dir, dtype="float32")
    base = load_model(str(tiny_model), dtype="float32")
    fmt = PromptFormat(base.tokenizer)
    samples = encode_records(read_records(data), fmt, 512, "truncate", True).samples
    for side, loaded in (("base", base), ("adapted", adapted)):
        total, count = 0.0, 0
        for s in samples:
            logits = np.array(loaded.model(mx.array(s.ids[None, :-1]))[0].astype(mx.float32), dtype=np.float64)
            log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            positions = np.arange(s.loss_start - 1, len(s.ids) - 1)
            total -= log_probs[positions, s.ids[positions + 1]].sum()
            count += len(positions)
        assert result["learned"][side]["tokens"] == count
        assert result["learned"][side]["loss"] == pytest.approx(total / count, rel=1e-5)


def test_zero_adapter_disturbs_nothing_and_a_trained_one_does(run_copy, tiny_model):
    trained = load_with_adapter(str(tiny_model), run_copy, dtype="float32")
    samples = encode_records(neutral_records(), PromptFormat(trained.tokenizer), 512, "truncate", True).samples
    assert sum(kl for kl, _ in example_kl(trained.model, samples)) > 0

    weights = mx.load(str(run_copy / ADAPTER_FILE))
    mx.save_safetensors(str(run_copy / ADAPTER_FILE),
                        {k: mx.zeros_like(v) if k.endswith("lora_b") else v for k, v in weights.items()})
    zero = evaluate_adapter(run_copy, overrides={"max_tokens": 8, "generations": 1}, log=lambda _: None)
    assert zero["disturbed"]["kl"]["mean"] == 0.0
    assert zero["disturbed"]["reference"]["change"] == 0.0 and zero["learned"]["gain"] == 0.0
    assert zero["generations"][0]["base"] == zero["generations"][0]["adapted"]
    assert zero["works"] is None and zero["data"]["source"] == "the run's validation split"


def test_candidate_code_is_found_and_run_against_its_tests(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", PROBLEMS)
    add, square, reverse = read_examples(read_records(data), samples=1)
    sandbox = Sandbox(timeout_seconds=5, memory_mb=256)

    def outcome(example, answer):
        return sandbox.run(example.tests.program(extract_code(answer, example))).status

    assert outcome(add, "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.") == "passed"
    assert outcome(add, "```python\ndef add(a, b):\n    return a - b\n```") == "failed"
    assert outcome(square, "    return x * x\n") == "passed"  # a completion of the prompt's code
    # The same through a chat template that trims messages (Llama 2's, CodeLlama-Instruct's): the first
    # line's indentation is gone, or every line's.
    assert outcome(square, "return x * x") == "passed"
    assert outcome(square, "y = x * x\n    return y") == outcome(square, "y = x * x\nreturn y") == "passed"
    assert outcome(square, "```py\ndef square(x):\n    return x ** 2\n```") == "passed"
    assert outcome(reverse, "def reverse(items):\n    return items[::-1]") == "passed"  # no fence at all
    assert outcome(reverse, "  def reverse(items):\n      return items[::-1]") == "passed"  # indented as a whole
    assert outcome(reverse, "def reverse(items):\n    while True: pass") == "timeout"


def test_bad_eval_data_names_the_example(run_copy, tiny_model, tmp_path):
    rows = [PROBLEMS[0], {"instruction": "Say hi", "response": "hi"},
            {**PROBLEMS[1], "test": "def check(candidate):\n    assert candidate(3) == = 9\n"},
            {**PROBLEMS[2], "tests": ["assert reverse([1]) == [1]", "assert reverse(["]},
            {**PROBLEMS[1], "entry_point": None}, {**PROBLEMS[0], "concept": 3},
            {"instruction": "Reverse", "response": "x", "tests": ["assert f() == 1"], "entry_point": "f"}]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError) as err:
        read_examples(read_records(data), samples=2)
    assert err.value.problems == [
        f"{data}:2: no tests to run, but samples is 2; add 'test' + 'entry_point' or 'tests' to this example, "
        "or leave samples unset",
        f"{data}:3: field 'test' is not valid Python (line 2: invalid syntax); fix the test code",
        f"{data}:4: tests[1] is not valid Python (line 1: '[' was never closed); fix the test code",
        f"{data}:5: field 'entry_point' must name the function the tests call, as 'test' (HumanEval style) "
        "passes it to check()",
        f"{data}:6: field 'concept' must be a non-empty string",
        f"{data}:7: 'tests' (assert lines) is given, so drop 'entry_point': those belong to HumanEval-style tests "
        "('test' defining check(candidate) + 'entry_point')"]

    result = CliRunner().invoke(cli, ["eval", str(run_copy), "--data", str(data), "--samples", "1"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"error: {data}:2: no tests to run" in result.output
    assert not (run_copy / "eval.json").exists()

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": {"path": str(tiny_model)}, "data": {"train": str(data), "valid": str(data)},
                                  "eval": {"enabled": True, "samples": 2}}))
    result = CliRunner().invoke(cli, ["validate", str(config)])
    assert result.exit_code == 2 and f"error: {data}:7: 'tests' (assert lines) is given" in result.output, result.output


def test_cli_eval_of_a_plain_mlx_lm_adapter_and_registry_show(run_copy, tiny_model, tmp_path):
    from mlx_surgical.export import export_adapter

    plain = export_adapter(run_copy, "mlx", tmp_path / "plain-adapter")
    data = write_jsonl(tmp_path / "held_out.jsonl", [{k: v for k, v in p.items() if k in (
        "instruction", "response", "prompt", "completion", "concept", "tags")} for p in PROBLEMS])
    missing = CliRunner().invoke(cli, ["eval", str(plain), "--data", str(data)])
    assert missing.exit_code == 2 and "name the base model with --model" in missing.output

    result = CliRunner().invoke(cli, ["eval", str(plain), "--model", str(tiny_model), "--data", str(data),
                                      "--max-tokens", "8", "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert written["works"] is None and written["data"]["scored"] == 3
    assert written["summary"]["line"] in result.output and "held-out loss" in result.output
    assert f"wrote {tmp_path / 'report' / 'eval.json'} and {tmp_path / 'report' / 'eval.md'}" in result.output

    # The export remembers how its run cut examples (max_seq_length 512), so it scores as the run does.
    from_run = evaluate_adapter(run_copy, data=str(data), overrides={"max_tokens": 8}, out_dir=tmp_path / "run-report",
                                log=lambda _: None)
    for side in ("base", "adapted"):
        assert written["disturbed"]["reference"][side] == pytest.approx(from_run["disturbed"]["reference"][side])
        assert written["learned"][side] == pytest.approx(from_run["learned"][side])

    assert "eval" not in show(run_copy.parent, run_copy.name)
    shutil.copy(tmp_path / "report" / "eval.json", run_copy / "eval.json")
    shown = CliRunner().invoke(cli, ["adapters", "--root", str(run_copy.parent), "show", run_copy.name])
    assert json.loads(shown.output)["eval"] == written["summary"]


def test_data_accepts_eval_fields_and_a_training_run_ends_with_its_report(tiny_model, tmp_path):
    raw = {"model": {"path": str(tiny_model), "dtype": "float32"}, "lora": {"dropout": 0.0},
           "data": {"examples": PROBLEMS, "valid_examples": PROBLEMS},
           "training": {"iters": 2, "grad_accumulation_steps": 1, "max_seq_length": 256, "learning_rate": 1e-2},
           "eval": {"enabled": True, "max_tokens": 8, "generations": 1},
           "output": {"dir": str(tmp_path / "adapters"), "name": "with-eval"}}
    config = config_from_dict(raw)
    assert "train: 3 examples" in validate_run(config)
    logged = []
    result = train_run(config, progress=False, log=logged.append)
    written = json.loads((result.run_dir / "eval.json").read_text())
    assert written["works"]["problems"] == 3 and written["settings"]["generations"] == 1
    assert any(written["summary"]["line"] in line for line in logged)

    no_valid = {**raw, "data": {"examples": PROBLEMS}}
    with pytest.raises(UserError, match="eval.enabled: the report needs held-out examples"):
        config_from_dict(no_valid)
    bad = {**raw, "data": {"examples": PROBLEMS, "valid_examples": [{"instruction": "a", "response": "b"}]},
           "eval": {"enabled": True, "samples": 1}, "output": {**raw["output"], "name": "bad-eval"}}
    with pytest.raises(UserError, match=r"data.valid_examples\[0\]: no tests to run"):
        train_run(config_from_dict(bad), progress=False, log=lambda _: None)
    assert not (tmp_path / "adapters" / "bad-eval").exists()


def test_an_adapter_that_learned_a_solution_passes_its_tests(tiny_model, tmp_path):
    """The tiny model trained on one problem's answer writes it (a Llama 2 chat template trims its
    indentation): the report counts that candidate as passing, the base's and the other problem's
    as failing, overall and per concept."""
    square, add = PROBLEMS[1], PROBLEMS[0]
    raw = {"model": {"path": str(tiny_model), "dtype": "float32"},
           "lora": {"dropout": 0.0, "rank": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"]},
           "data": {"examples": [square] * 8, "valid_examples": [square, add]},
           "training": {"iters": 32, "batch_size": 4, "grad_accumulation_steps": 1, "learning_rate": 3e-2,
                        "warmup_steps": 2, "max_seq_length": 256},
           "eval": {"enabled": True, "samples": 1, "max_tokens": 16, "generations": 1},
           "output": {"dir": str(tmp_path / "adapters"), "name": "memorised"}}
    result = train_run(config_from_dict(raw), progress=False, log=lambda _: None)
    report = json.loads((result.run_dir / "eval.json").read_text())
    works = report["works"]
    statuses = {side: [p["statuses"] for p in works["problems_detail"][side]] for side in ("base", "adapted")}
    assert statuses == {"base": [["failed"], ["failed"]], "adapted": [["passed"], ["failed"]]}, report["generations"]
    assert works["base"] == {"pass@1": 0.0} and works["adapted"] == {"pass@1": 0.5}
    assert report["concepts"]["completion"]["works"]["adapted"] == {"pass@1": 1.0}
    assert report["concepts"]["arithmetic"]["works"]["adapted"] == {"pass@1": 0.5}
    assert report["learned"]["gain"] > 1.0


def test_reference_text_is_a_few_thousand_tokens_of_prose_and_code(report):
    records = reference_records()
    assert {r.fields["concept"] for r in records} == {"prose", "code"}
    code = "\n\n\n".join(r.fields["text"] for r in records if r.fields["concept"] == "code")
    compile(code, "code.txt", "exec")
    by_kind = report[2]["disturbed"]["reference"]["by_kind"]
    assert all(1500 < figures["base"]["tokens"] < 5000 for figures in by_kind.values())


def test_eval_from_another_folder_finds_a_base_the_config_named_by_a_relative_path(tiny_model, tmp_path,
                                                                                   monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(tiny_model, work / "models" / "tiny")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    config = config_from_dict({"model": {"path": "models/tiny", "dtype": "float32"}, "lora": {"dropout": 0.0},
                               "data": {"examples": PROBLEMS, "valid_examples": PROBLEMS},
                               "training": {"iters": 1, "grad_accumulation_steps": 1, "max_seq_length": 256},
                               "output": {"dir": "adapters", "name": "relative"}})
    run_dir = train_run(config, progress=False, log=lambda _: None).run_dir.resolve()

    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(cli, ["eval", str(run_dir), "--samples", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "eval.json").read_text())["base_model"] == str(work / "models" / "tiny")

    # An adapter config that records no base (edited by hand, or mlx-lm's own): the run's config names it.
    monkeypatch.chdir(work)
    adapter_config = json.loads((run_dir / "adapter_config.json").read_text())
    (run_dir / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model": None}))
    result = CliRunner().invoke(cli, ["eval", str(run_dir), "--samples", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "eval.json").read_text())["base_model"] == "models/tiny"
