"""Training data: read examples, write prompts, tokenize, mask, and cut into batches.

Accepted example shapes (one JSON object per example, from .jsonl, .json or inline):
  {"instruction": ..., "response": ...}             (optional "input", "system")
  {"instruction": ..., "input": ..., "output": ...}  Alpaca
  {"prompt": ..., "completion": ...}                 mlx-lm
  {"messages": [{"role": ..., "content": ...}, ...]} chat; the last message is the answer
  {"text": ...}                                      plain text, loss on every token
"""

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import UserError, not_utf8, parse_user_json, read_user_bytes, read_user_text

SAMPLE_SPLITS = ("train", "valid", "test")
ROLES = ("system", "user", "assistant")
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


def read_records(path: str | Path) -> list[Record]:
    """Read a .jsonl (one object a line) or .json (a list of objects) file. Every line that is
    not UTF-8 or not JSON is reported, not only the first."""
    path = Path(path)
    hint = "; check data.train / data.valid in the config"
    if path.suffix == ".json":
        rows = parse_user_json(read_user_text(path, "data", hint), path)
        if not isinstance(rows, list):
            raise UserError(f"{path}: a .json data file must hold a list of examples")
        return [Record(row, f"{path}[{i}]") for i, row in enumerate(rows)]
    records, problems = [], {}  # line number -> its problems
    data = read_user_bytes(path, "data", hint).removeprefix(b"\xef\xbb\xbf")  # a BOM some editors write
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
    f = record.fields
    if not isinstance(f, dict):
        raise UserError(f"{record.origin}: expected a JSON object, got {type(f).__name__}")

    def text(key):
        value = f.get(key)
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{record.origin}: field '{key}' must be a non-empty string")
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


def check_records(records: list[Record], where: str) -> list[list[dict]]:
    """Every example's messages; raises listing every bad example."""
    if not records:
        raise UserError(f"{where}: no examples; add at least one instruction/response pair")
    first = first_shaped(records)
    raise_problems([p for record in records for p in record_problems(record, first)])
    return [to_messages(record)[0] for record in records]


class PromptFormat:
    """Writes prompts the same way for training and for generation, so an adapter is always
    asked questions in the form it learned."""

    def __init__(self, tokenizer, style: str = "auto", system_prompt: Optional[str] = None):
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if style == "chat_template" and not has_template:
            raise UserError("data.prompt_format: the tokenizer has no chat template; use 'llama2' or 'auto'")
        self.style = "chat_template" if style == "chat_template" or (style == "auto" and has_template) else "llama2"
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}] + messages
        return messages

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of everything before the answer, ending where the model starts writing."""
        messages = self._with_system(messages)
        if self.style == "chat_template":
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self._encode(text)
        # CodeLlama-Instruct / Llama-2: <s>[INST] <<SYS>>..<</SYS>> user [/INST] answer </s><s>[INST] ...
        ids, system = [], ""
        for m in messages:
            if m["role"] == "system":
                system = f"<<SYS>>\n{m['content']}\n<</SYS>>\n\n"
            elif m["role"] == "user":
                ids += [self.tokenizer.bos_token_id] + self._encode(f"[INST] {system}{m['content'].strip()} [/INST]")
                system = ""
            else:
                ids += self._encode(m["content"].strip()) + [self.tokenizer.eos_token_id]
        return ids

    def example_ids(self, messages: list[dict], has_answer: bool) -> tuple[list[int], int]:
        """(token ids, prompt length): the loss covers ids[prompt length:]."""
        if not has_answer:
            ids = [self.tokenizer.bos_token_id] + self._encode(messages[0]["content"]) + [self.tokenizer.eos_token_id]
            return ids, 1
        prompt = self.prompt_ids(messages[:-1])
        answer = messages[-1]["content"]
        if self.style == "llama2":
            answer = answer.strip()
        return prompt + self._encode(answer) + [self.tokenizer.eos_token_id], len(prompt)


@dataclass
class Sample:
    ids: np.ndarray  # int32 token ids
    loss_start: int  # first position whose token is learned
    origin: str


@dataclass
class EncodedData:
    samples: list[Sample]
    truncated: list[str]
    skipped: list[str]

    def report_lines(self, split: str) -> list[str]:
        lines = []
        if self.truncated:
            lines.append(f"{split}: {len(self.truncated)} example(s) longer than max_seq_length had their "
                         f"response cut: {', '.join(self.truncated[:5])}{' ...' if len(self.truncated) > 5 else ''}")
        if self.skipped:
            lines.append(f"{split}: {len(self.skipped)} example(s) left out because their prompt fills "
                         f"max_seq_length or overlength is 'skip': {', '.join(self.skipped[:5])}"
                         f"{' ...' if len(self.skipped) > 5 else ''}")
        return lines

    @property
    def tokens(self) -> int:
        return sum(len(s.ids) for s in self.samples)


def encode_records(records: list[Record], fmt: PromptFormat, max_seq_length: int,
                   overlength: str, mask_prompt: bool) -> EncodedData:
    samples, truncated, skipped, problems = [], [], [], []
    for record in records:
        messages, has_answer = to_messages(record)
        ids, loss_start = fmt.example_ids(messages, has_answer)
        if not mask_prompt:
            loss_start = 1
        if len(ids) > max_seq_length:
            if overlength == "error":
                problems.append(f"{record.origin}: example is {len(ids)} tokens, longer than training.max_seq_length "
                                f"({max_seq_length}); raise max_seq_length or set data.overlength to truncate or skip")
                continue
            # A response cut to nothing would train the model to answer with nothing.
            if overlength == "skip" or loss_start >= max_seq_length - 1:
                skipped.append(record.origin)
                continue
            ids = ids[:max_seq_length]
            truncated.append(record.origin)
        samples.append(Sample(np.asarray(ids, np.int32), loss_start, record.origin))
    raise_problems(problems)
    return EncodedData(samples, truncated, skipped)


def split_records(data_config, split: str) -> list[Record]:
    """The records of 'train' or 'valid' from a file or inline; [] for an absent valid set."""
    path = data_config.train if split == "train" else data_config.valid
    inline = data_config.examples if split == "train" else data_config.valid_examples
    if path is not None:
        records = read_records(path)
        where = str(path)
    elif inline is not None:
        where = "data.examples" if split == "train" else "data.valid_examples"
        records = inline_records(inline, where)
    else:
        return []
    check_records(records, where)
    return records


# --- batching -------------------------------------------------------------------------------

def bucket(length: int) -> int:
    """Round a batch width (or its count of learned positions) up to a bucket: a multiple of 8
    up to 256, beyond that of 1/16 of the power of two below it. Padding stays under 6% (3% on
    average) and the compiled step sees at most 16 shapes per doubling of length."""
    step = max(8, 1 << max(length.bit_length() - 5, 0))
    return -(-max(length, 1) // step) * step


def padded_length(length: int, max_seq_length: int) -> int:
    return min(bucket(length), max_seq_length)


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A deterministic function of (seed, epoch), so a resumed run sees the same order. Examples
    of similar length share a batch (less padding); the batch order is shuffled."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [[int(i) for i in chunk[j:j + batch_size]] for j in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class Batch:
    inputs: np.ndarray  # (batch, width) int32
    targets: np.ndarray  # (batch, width) int32, inputs shifted by one
    loss_index: np.ndarray  # (n,) int32 flat positions whose target is learned, padded to a bucket
    loss_weight: np.ndarray  # (n,) float32, 1 for a learned position, 0 for bucket padding
    tokens: int  # real (unpadded) input tokens

    def loss_inputs(self) -> tuple:
        """The arrays every loss in `loss.py` takes after the model."""
        return self.inputs, self.targets, self.loss_index, self.loss_weight

    def without_loss(self) -> "Batch":
        return Batch(self.inputs, self.targets, self.loss_index, np.zeros_like(self.loss_weight), 0)


def collate(samples: list[Sample], max_seq_length: int) -> Batch:
    """Pad a list of samples to one width and list the positions whose next token is learned;
    both are rounded up to a bucket, so the compiled step is traced once per bucket."""
    width = padded_length(max(len(s.ids) for s in samples) - 1, max_seq_length)
    inputs = np.zeros((len(samples), width), np.int32)
    targets = np.zeros((len(samples), width), np.int32)
    learned = []
    for row, s in enumerate(samples):
        n = len(s.ids) - 1
        inputs[row, :n] = s.ids[:-1]
        targets[row, :n] = s.ids[1:]
        learned.append(row * width + np.arange(max(s.loss_start - 1, 0), n))
    learned = np.concatenate(learned).astype(np.int32)
    slots = min(bucket(len(learned)), inputs.size)
    loss_index = np.zeros(slots, np.int32)
    loss_weight = np.zeros(slots, np.float32)
    loss_index[:len(learned)] = learned
    loss_weight[:len(learned)] = 1.0
    return Batch(inputs, targets, loss_index, loss_weight, sum(len(s.ids) - 1 for s in samples))


class BatchStream:
    """Micro-batches in training order, addressable by position so resume can start anywhere.

    batch_size is the global batch. With several data-parallel ranks every rank computes the
    same order and takes its share, rank::ranks, of each global batch; positions count global
    batches, so a run can resume on a different number of ranks."""

    def __init__(self, samples: list[Sample], batch_size: int, seed: int, max_seq_length: int,
                 rank: int = 0, ranks: int = 1):
        if not samples:
            raise UserError("training data: no example is left to train on after length checks")
        self.samples = samples
        self.batch_size = batch_size
        self.seed = seed
        self.max_seq_length = max_seq_length
        self.rank, self.ranks = rank, ranks
        self.lengths = [len(s.ids) for s in samples]
        self.per_epoch = -(-len(samples) // batch_size)
        self._cache: dict[int, list[list[int]]] = {}

    def indices(self, position: int) -> list[int]:
        epoch, index = divmod(position, self.per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: epoch_batches(self.lengths, self.batch_size, self.seed, epoch)}
        return self._cache[epoch][index]

    def batch(self, position: int) -> Batch:
        indices = self.indices(position)
        share = indices[self.rank::self.ranks]
        if not share:
            # A short last batch can leave a rank nothing: it contributes a fully masked
            # example, so its gradient and token count are zero.
            return collate([self.samples[indices[0]]], self.max_seq_length).without_loss()
        return collate([self.samples[i] for i in share], self.max_seq_length)


def eval_batches(samples: list[Sample], batch_size: int, max_seq_length: int):
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].ids))
    for start in range(0, len(order), batch_size):
        yield collate([samples[i] for i in order[start:start + batch_size]], max_seq_length)
