"""Training data: read examples and check them (prompt.py writes and tokenizes them,
batches.py cuts them into batches).

Accepted example shapes (one JSON object per example, from .jsonl, .json or inline):
  {"instruction": ..., "response": ...}             (optional "input", "system")
  {"instruction": ..., "input": ..., "output": ...}  Alpaca
  {"prompt": ..., "completion": ...}                 mlx-lm
  {"messages": [{"role": ..., "content": ...}, ...]} chat; the last message is the answer
  {"text": ...}                                      plain text, loss on every token
"""

import difflib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

from .errors import UTF8_BOM, UserError, not_text, not_utf8, parse_user_json, read_user_bytes, read_user_text

SAMPLE_SPLITS = ("train", "valid", "test")
ROLES = ("system", "user", "assistant")
# Every field an example may carry (the evaluation's too): none of them is taken for a misspelling.
KNOWN_FIELDS = {"instruction", "input", "output", "response", "prompt", "completion", "messages", "text", "system",
                "test", "entry_point", "tests", "concept", "tags"}
MAX_PROBLEMS = 20  # bad examples listed by name; beyond that, how many more


def raise_problems(problems: list[str]) -> None:
    """Every bad example at once (up to MAX_PROBLEMS), so a file is fixed in one pass."""
    if problems:
        more = len(problems) - MAX_PROBLEMS
        raise UserError(*problems[:MAX_PROBLEMS],
                        f"... and {more} more problem{'s' if more > 1 else ''}" if more > 0 else "")


def sample_path(split: str) -> Path:
    """The bundled instruction/response pairs about code (see scripts/build_sample_data.py)."""
    return Path(str(resources.files("mlx_surgical") / "samples" / f"{split}.jsonl"))


def bundled_texts() -> list[str]:
    """Every instruction and response in the bundled data, the corpus for the tiny tokenizer."""
    texts = []
    for split in SAMPLE_SPLITS:
        for record in read_records(sample_path(split)):
            texts += [record.fields["instruction"], record.fields["response"]]
    return texts


@dataclass
class Record:
    fields: dict
    origin: str  # "file.jsonl:12" or "data.examples[3]", for error messages


def read_records(path: str | Path, named_by: str = "data.train / data.valid in the config") -> list[Record]:
    """Read a .jsonl (one object a line) or .json (a list of objects) file. Every line that is
    not UTF-8 or not JSON is reported, not only the first. `named_by` is where the user named
    the file (a missing file's hint)."""
    path = Path(path)
    hint = f"; check {named_by}"
    if path.suffix == ".json":
        rows = parse_user_json(read_user_text(path, "data", hint), path)
        if not isinstance(rows, list):
            raise UserError(f"{path}: a .json data file must hold a list of examples")
        return [Record(row, f"{path}[{i}]") for i, row in enumerate(rows)]
    records, problems = [], {}  # line number -> its problems
    data = read_user_bytes(path, "data", hint).removeprefix(UTF8_BOM)
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems[lineno] = [not_utf8(f"{path}:{lineno}", e)]
            continue
        if not line.strip():
            continue
        try:
            records.append((lineno, Record(json.loads(line), f"{path}:{lineno}")))
        except json.JSONDecodeError as e:
            problems[lineno] = [f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno}); "
                                "each line must be one JSON object"]
        except RecursionError:
            problems[lineno] = [f"{path}:{lineno}: JSON nested too deeply; each line must be one flat example object"]
    if problems:  # the lines that did parse are checked too, so one pass fixes the whole file
        first = first_shaped([r for _, r in records])
        for lineno, record in records:
            if found := record_problems(record, first):
                problems[lineno] = found
        raise_problems([p for lineno in sorted(problems) for p in problems[lineno]])
    return [r for _, r in records]


def inline_records(rows: list, where: str) -> list[Record]:
    return [Record(row, f"{where}[{i}]") for i, row in enumerate(rows)]


def example_format(fields) -> Optional[str]:
    """Which accepted shape an example has, by its keys (None when it has none of them)."""
    if not isinstance(fields, dict):
        return None
    if "messages" in fields:
        return "messages"
    if "instruction" in fields:
        return "instruction/input/output" if "output" in fields else "instruction/response"
    if "prompt" in fields:
        return "prompt/completion"
    return "text" if "text" in fields else None


def to_messages(record: Record) -> tuple[list[dict], bool]:
    """Normalise any accepted shape to chat messages; the flag says whether the last message is
    an answer to be learned (False for plain text)."""
    messages, has_answer = _shaped_messages(record)
    raise_problems([p for m in messages if (p := not_text(f"{record.origin}: {m['role']} message", m["content"]))])
    return messages, has_answer


def _shaped_messages(record: Record) -> tuple[list[dict], bool]:
    f = record.fields
    if not isinstance(f, dict):
        raise UserError(f"{record.origin}: expected a JSON object, got {type(f).__name__}")

    def text(key):
        value = f.get(key)
        if not isinstance(value, str) or not value.strip():
            close = [] if key in f else difflib.get_close_matches(key, [k for k in f if k not in KNOWN_FIELDS], n=1)
            typo = f" (is '{close[0]}' a misspelling of it?)" if close else ""
            raise UserError(f"{record.origin}: field '{key}' must be a non-empty string{typo}")
        return value

    system = [{"role": "system", "content": f["system"]}] if isinstance(f.get("system"), str) else []
    if "messages" in f:
        messages = f["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{record.origin}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(f"{record.origin}: messages[{i}] needs a role ({', '.join(ROLES)}) and string content")
        if messages[-1]["role"] != "assistant":
            raise UserError(f"{record.origin}: the last message must have role 'assistant' (the answer to learn)")
        if not any(m["role"] == "user" for m in messages[:-1]):
            raise UserError(f"{record.origin}: no 'user' message before the answer; add the request it answers")
        return messages, True
    if "instruction" in f:
        answer_key = "output" if "output" in f else "response"
        instruction = text("instruction")
        if isinstance(f.get("input"), str) and f["input"].strip():
            instruction = f"{instruction}\n\n{f['input']}"
        return system + [{"role": "user", "content": instruction},
                         {"role": "assistant", "content": text(answer_key)}], True
    if "prompt" in f:
        return system + [{"role": "user", "content": text("prompt")},
                         {"role": "assistant", "content": text("completion")}], True
    if "text" in f:
        return [{"role": "user", "content": text("text")}], False
    raise UserError(f"{record.origin}: no known fields; use instruction/response, instruction/input/output, "
                    "prompt/completion, messages or text (found: " + ", ".join(map(str, f)) + ")")


def first_shaped(records: list[Record]) -> Optional[Record]:
    """The first example of an accepted shape: the one the others must match."""
    return next((r for r in records if example_format(r.fields)), None)


def record_problems(record: Record, first: Optional[Record]) -> list[str]:
    """What is wrong with one example: its fields, or a shape other than the first example's
    (a file mixing shapes is almost always a mistake)."""
    try:
        to_messages(record)
    except UserError as e:
        return e.problems
    shape = example_format(record.fields)
    if first is not None and shape != example_format(first.fields):
        return [f"{record.origin}: a {shape} example among {example_format(first.fields)} examples "
                f"(as at {first.origin}); use one format per file"]
    return []


def check_records(records: list[Record], where: str) -> None:
    """Raises listing every bad example."""
    if not records:
        raise UserError(f"{where}: no examples; add at least one instruction/response pair")
    first = first_shaped(records)
    raise_problems([p for record in records for p in record_problems(record, first)])


def split_records(data_config, split: str) -> list[Record]:
    """The records of 'train' or 'valid' from a file or inline; [] for an absent valid set."""
    path = data_config.train if split == "train" else data_config.valid
    inline = data_config.examples if split == "train" else data_config.valid_examples
    if path is not None:
        records = read_records(path, f"data.{split} in the config")
        where = str(path)
    elif inline is not None:
        where = "data.examples" if split == "train" else "data.valid_examples"
        records = inline_records(inline, where)
    else:
        return []
    check_records(records, where)
    return records
