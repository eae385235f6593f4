"""The one typed run config: every default and every help text lives here, once.

A config is JSON with the sections below. Loading checks every key and value and reports
all problems at once (unknown keys, wrong types, out-of-range values), each as one line
naming the field. The CLI, the server and the presets in configs/ all go through
`load_config` / `config_from_dict`, so they cannot disagree.
"""

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

from .console import alternatives
from .data import SAMPLE_SPLITS, sample_path
from .errors import UserError, not_text, parse_user_json, read_user_text
from .files import write_json_atomic
from .shape import PROJECTION_PATHS


def option(default, help: str, **kwargs):
    """A dataclass field carrying its help text (shown by `mlx-surgical config-help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    path: str = option("", "Hugging Face repo id, or a local MLX/Hugging Face model directory "
                       "(the output of `mlx-surgical convert`); a relative directory is looked up from the "
                       "working directory, then from the config file's folder.")
    revision: Optional[str] = option(None, "Hub revision (branch, tag or commit) when path is a repo id.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = option(
        "auto", "Train with the unquantized base weights in this dtype. auto: float32 where MLX runs on the "
        "CPU (the only dtype its matmuls run fast in; float16 is about 30x slower), the stored dtype on Metal.")


@dataclass
class LoraConfig:
    rank: int = option(8, "LoRA rank r.")
    alpha: float = option(16.0, "LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = option(0.05, "Dropout on the LoRA input, in [0, 1).")
    target_modules: list[str] = option(
        ["q_proj", "k_proj", "v_proj"],
        "Projections to adapt, by name: " + ", ".join(PROJECTION_PATHS) + ".")
    layers: Union[int, Literal["all"]] = option("all", "'all', or N to adapt only the last N layers.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class DataConfig:
    train: Optional[str] = option(None, "Training file (.jsonl or .json), relative to the config file.")
    valid: Optional[str] = option(None, "Validation file (.jsonl or .json), relative to the config file.")
    examples: Optional[list[dict]] = option(None, "Training examples inline, instead of a train file.")
    valid_examples: Optional[list[dict]] = option(None, "Validation examples inline, instead of a valid file.")
    prompt_format: Literal["auto", "chat_template", "llama2"] = option(
        "auto", "How prompts are written: the tokenizer's chat template, or CodeLlama-Instruct's "
        "'<s>[INST] ... [/INST]'; auto uses the template when the tokenizer has one.")
    system_prompt: Optional[str] = option(None, "System prompt added to every example.")
    mask_prompt: bool = option(True, "Take the loss on response tokens only.")
    overlength: Literal["truncate", "skip", "error"] = option(
        "truncate", "What to do with an example longer than training.max_seq_length: cut the end of "
        "its response, leave it out, or stop. Each case is reported; an example whose response "
        "would be cut away entirely is always left out.")


DEFAULT_EPOCHS = 3


@dataclass
class TrainingConfig:
    epochs: Optional[int] = option(None, f"Passes over the training data (default {DEFAULT_EPOCHS} when iters is "
                                         "not set).")
    iters: Optional[int] = option(None, "Optimizer updates to run, instead of epochs.")
    learning_rate: float = option(1e-4, "Peak learning rate, reached at the end of warmup.")
    min_learning_rate: float = option(0.0, "Learning rate at the end of the decay.")
    warmup_steps: int = option(50, "Optimizer updates of linear warmup from 0 to learning_rate.")
    schedule: Literal["cosine", "linear", "constant"] = option(
        "cosine", "Decay after warmup, counted in optimizer updates.")
    weight_decay: float = option(0.01, "AdamW decoupled weight decay.")
    batch_size: int = option(1, "Examples per micro-batch, across all ranks under mlx.launch (each of N ranks "
                             "takes batch_size / N).")
    grad_accumulation_steps: int = option(4, "Micro-batches per optimizer update; the effective "
                                          "batch is batch_size x grad_accumulation_steps.")
    max_seq_length: int = option(2048, "Longest example in tokens (prompt + response).")
    seed: int = option(0, "Seed for LoRA initialisation, dropout and data order.")
    save_every: int = option(100, "Write a resumable checkpoint every N optimizer updates.")
    eval_every: int = option(50, "Validation loss every N optimizer updates (and at the end).")
    patience: int = option(0, "Stop after this many evaluations without a better validation "
                           "loss; 0 turns early stopping off.")
    keep_checkpoints: int = option(2, "How many resumable checkpoints to keep.")
    grad_checkpoint: bool = option(False, "Recompute layer activations in the backward pass to save memory.")
    cpu_math: Literal["auto", "fast", "plain"] = option(
        "auto", "MLX CPU backend only: 'fast' computes exp, attention and SwiGLU with mlx_surgical's own "
        "kernels, 'plain' with MLX's ops; 'auto' times both on the first run of a model shape on this "
        "machine and keeps the faster (which one wins depends on the CPU).")
    cpu_quantized_matmul: Literal["auto", "dequantize", "native"] = option(
        "auto", "MLX CPU backend, quantized base only: 'dequantize' multiplies by each frozen weight "
        "dequantized to float inside the step (BLAS speed, memory stays quantized), 'native' uses MLX's "
        "quantized_matmul; 'auto' measures both once per machine and model shape.")
    cpu_paired_micro_batches: Literal["auto", "on", "off"] = option(
        "auto", "MLX CPU backend, 2+ accumulation steps, one process: 'on' computes two micro-batches "
        "at once, each on its own CPU stream with a one-thread BLAS, so every core also does elementwise "
        "work (twice the activation memory); 'off' one at a time on a multi-threaded BLAS; 'auto' "
        "measures both once per machine and model shape.")


@dataclass
class OutputConfig:
    dir: str = option("adapters", "Directory that holds one folder per run, relative to the working directory.")
    name: Optional[str] = option(None, "Run name (letters, digits, '.', '_', '-'); default: "
                                 "the config file's name and the start time.")


@dataclass
class EvalConfig:
    enabled: bool = option(False, "Evaluate the adapter when training ends: eval.json and eval.md in the run "
                           "directory, as `mlx-surgical eval RUN_DIR` writes them.")
    samples: Optional[int] = option(
        None, "Candidates generated and run per example that carries tests (1 = greedy, more = sampled at "
        "temperature; pass@1 and pass@samples are reported). Unset (null): one greedy candidate for examples "
        "with tests; 0: run nothing. A number requires every example to carry tests.")
    temperature: float = option(0.8, "Sampling temperature when samples is above 1.")
    max_tokens: int = option(256, "Longest generated answer, in tokens.")
    generations: int = option(3, "Held-out prompts answered side by side by the base and the adapted model.")
    timeout_seconds: float = option(10.0, "Wall-clock (and CPU-time) limit for running one candidate with its tests.")
    memory_mb: int = option(1024, "Address-space limit for running one candidate, in MB.")
    seed: int = option(0, "Seed for sampled candidates.")


@dataclass
class RunConfig:
    description: str = option("", "Free text for humans.")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ConvertConfig:
    """`mlx-surgical convert`'s quantization settings (not part of a run's config)."""
    BITS = (4, 8)
    GROUP_SIZES = (32, 64, 128)
    DTYPES = ("float16", "bfloat16", "float32")

    bits: Optional[int] = option(4, f"Quantization bits ({alternatives(BITS)}); none keeps the weights unquantized. "
                                    "GGUF tensors in Q4_0, Q4_1 or Q8_0 keep their own bits unless none.")
    group_size: int = option(64, f"Weights that share one quantization scale ({alternatives(GROUP_SIZES)}).")
    dtype: Optional[str] = option(None, "dtype of the unquantized parts [default: float32 where MLX runs on the CPU, "
                                        "which trains fastest there; float16 on Metal].")


@dataclass
class ServeConfig:
    """The server's settings: `mlx-surgical serve`'s options (not part of a run's config)."""
    host: str = option("127.0.0.1", "Address to listen on; beyond loopback only with --token or --allow-remote.")
    port: int = option(5001, "Port to listen on.")
    workspace: str = option(".", "Holds jobs/ and adapters/; data files in requests must be inside it.")
    max_body_mb: float = option(20.0, "Largest request body, in MB.")
    keep_jobs: int = option(500, "Finished jobs to keep; older ones are deleted (their adapters stay).")
    token: Optional[str] = option(None, "Require 'Authorization: Bearer TOKEN' on every route but the dashboard's "
                                        "page and a bare /api/health.")
    allow_remote: bool = option(False, "Bind beyond loopback without a token.")
    allow_hosts: tuple[str, ...] = option((), "Also accept this name in the Host and Origin headers (a reverse "
                                              "proxy's); repeatable.")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(f.type)}
RUN_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
MAX_NAME_LENGTH = 128  # inside any file system's 255 bytes a name, with room for a prefix or suffix
PLAIN_NAME = f"a plain name of at most {MAX_NAME_LENGTH} letters, digits, '.', '_' and '-'"


def is_plain_name(name: str) -> bool:
    """A run or upload name: safe as one path component everywhere, not hidden."""
    return 0 < len(name) <= MAX_NAME_LENGTH and set(name) <= RUN_NAME_CHARS and not name.startswith(".")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            dict: "an object"}.get(tp, str(tp))


def _matches(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _unknown_key(where: str, key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean '{close[0]}'?" if close else "known keys: " + ", ".join(known)
    return f"{where}{key}: unknown key; {hint}"


def config_from_dict(raw: Any, source: str = "config", base_dir: Optional[Path] = None) -> RunConfig:
    """Build a RunConfig from parsed JSON, reporting every problem at once. With `base_dir`
    (relative data paths are taken from there), data files that do not exist are named among
    the other problems; alone, they are left to the stage that reads the data, which reports
    them with the model's problems."""
    if not isinstance(raw, dict):
        examples = " (a list of examples belongs in data.train as a file, or in data.examples)" \
            if isinstance(raw, list) else ""
        raise UserError(f"{source}: the config must be a JSON object with sections {', '.join(SECTIONS)}{examples}")
    problems = []
    sections = {}
    description = raw.get("description", "")
    if not isinstance(description, str):
        problems.append(f"{source}: description: expected a string")
        description = ""
    for key, value in raw.items():
        if key == "description":
            continue
        if key not in SECTIONS:
            problems.append(_unknown_key(f"{source}: ", key, ["description", *SECTIONS]))
            continue
        sections[key] = section_from_dict(key, value, source, problems)
    config = RunConfig(description=description, **sections)
    problems += value_problems(config, source)
    if problems:
        raise UserError(*problems, *(missing_data_files(config, source, base_dir) if base_dir is not None else []))
    return config


def _text_problem(where: str, setting: Any) -> Optional[str]:
    """What is wrong with the strings of a setting (or of a list setting) that are not text, or None."""
    texts = setting if isinstance(setting, list) else [setting]
    return next((problem for text in texts if isinstance(text, str) and (problem := not_text(where, text))), None)


def section_from_dict(key: str, value: Any, source: str, problems: list[str]):
    """One section's dataclass from its JSON object; unknown keys and wrong types are added to
    problems (and left at their defaults)."""
    if not isinstance(value, dict):
        problems.append(f"{source}: {key}: expected an object of settings")
        value = {}
    hints = typing.get_type_hints(SECTIONS[key])
    kwargs = {}
    for name, setting in value.items():
        if name not in hints:
            problems.append(_unknown_key(f"{source}: {key}.", name, hints))
        elif not _matches(setting, hints[name]):
            problems.append(f"{source}: {key}.{name}: expected {_type_name(hints[name])}, got {json.dumps(setting)[:60]}")
        elif problem := _text_problem(f"{source}: {key}.{name}", setting):
            problems.append(problem)
        else:
            kwargs[name] = float(setting) if hints[name] is float else setting
    return SECTIONS[key](**kwargs)


def per_rank_batch(training: TrainingConfig, ranks: int, where: str = "training.batch_size") -> int:
    """The examples each of `ranks` data-parallel ranks takes from every global batch."""
    if ranks < 1:
        raise UserError(f"{where}: the number of ranks must be at least 1")
    if training.batch_size % ranks:
        batch = ranks * -(-training.batch_size // ranks)
        per_update = training.batch_size * training.grad_accumulation_steps
        same = (f" and training.grad_accumulation_steps to {per_update // batch}, which keeps {per_update} examples "
                "per update" if per_update % batch == 0 else "")
        raise UserError(f"{where}: the global batch of {training.batch_size} does not split evenly over {ranks} "
                        f"ranks (each takes batch_size / {ranks} examples); set training.batch_size to {batch}{same}")
    return training.batch_size // ranks


def value_problems(c: RunConfig, source: str) -> list[str]:
    """Range and consistency checks that the types alone cannot express."""
    p = []
    t, lora, data = c.training, c.lora, c.data

    def need(ok: bool, where: str, message: str):
        if not ok:
            p.append(f"{source}: {where}: {message}")

    p += [f"{source}: {problem}" for problem in number_problems("lora", lora) + number_problems("training", t)]
    need(bool(c.model.path), "model.path", "required: a Hugging Face repo id or a local model directory")
    need(lora.rank >= 1, "lora.rank", "must be at least 1")
    need(lora.alpha > 0, "lora.alpha", "must be positive")
    need(0 <= lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
    need(bool(lora.target_modules), "lora.target_modules", "list at least one projection")
    for name in lora.target_modules:
        need(name in PROJECTION_PATHS, "lora.target_modules",
             f"unknown projection '{name}'; choose from {', '.join(PROJECTION_PATHS)}")
    need(len(set(lora.target_modules)) == len(lora.target_modules), "lora.target_modules", "lists a projection twice")
    need(lora.layers == "all" or lora.layers >= 1, "lora.layers", "must be 'all' or a positive number of layers")
    need(data.train is not None or data.examples is not None, "data",
         "give training data: data.train (a file) or data.examples (inline)")
    need(data.train is None or data.examples is None, "data", "give data.train or data.examples, not both")
    need(data.valid is None or data.valid_examples is None, "data", "give data.valid or data.valid_examples, not both")
    for name in ("train", "valid"):
        if isinstance(getattr(data, name), str) and (problem := data_path_problem(getattr(data, name), f"data.{name}")):
            p.append(f"{source}: {problem}")
    need(t.epochs is None or t.iters is None, "training", "set training.epochs or training.iters, not both")
    need(t.epochs is None or t.epochs >= 1, "training.epochs", "must be at least 1")
    need(t.iters is None or t.iters >= 1, "training.iters", "must be at least 1")
    need(t.learning_rate > 0, "training.learning_rate", "must be positive")
    need(0 <= t.min_learning_rate <= t.learning_rate, "training.min_learning_rate", "must be between 0 and learning_rate")
    need(t.warmup_steps >= 0, "training.warmup_steps", "must be 0 or more")
    need(t.weight_decay >= 0, "training.weight_decay", "must be 0 or more")
    for name in ("batch_size", "grad_accumulation_steps", "save_every", "eval_every", "keep_checkpoints"):
        need(getattr(t, name) >= 1, f"training.{name}", "must be at least 1")
    need(t.max_seq_length >= 8, "training.max_seq_length", "must be at least 8 tokens")
    need(t.patience >= 0, "training.patience", "must be 0 (off) or more")
    p += [f"{source}: {problem}" for problem in eval_problems(c.eval)]
    need(not c.eval.enabled or data.valid is not None or data.valid_examples is not None, "eval.enabled",
         "the report needs held-out examples: give data.valid or data.valid_examples")
    if c.output.name is not None:
        need(is_plain_name(c.output.name), "output.name", f"use {PLAIN_NAME}")
    need("\0" not in c.output.dir, "output.dir", "the path contains a NUL character; give the folder's name as plain text")
    return p


def number_problems(where: str, section) -> list[str]:
    """NaN and Infinity parse as JSON numbers; counts feed MLX's 32-bit indices and a seed its 64-bit key."""
    problems = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{where}.{f.name}: must be a finite number")
        elif isinstance(value, int) and not isinstance(value, bool):
            if f.name == "seed" and not 0 <= value < 2 ** 64:
                problems.append(f"{where}.{f.name}: must be in [0, 2^64)")
            elif f.name != "seed" and value >= 2 ** 31:
                problems.append(f"{where}.{f.name}: must be below 2^31")
    return problems


def learning_rate_problem(value, where: str) -> Optional[str]:
    """What is wrong with a peak learning rate given on resume (from a flag or a JSON request), or None."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf):
        return None
    return f"{where}: give a positive number"


def eval_problems(e: EvalConfig) -> list[str]:
    """Range checks of the eval settings, shared by config files and the eval command's options."""
    checks = [(e.samples is None or e.samples >= 0, "eval.samples", "must be 0 or more (or null)"),
              (e.temperature > 0, "eval.temperature", "must be positive"),
              (e.max_tokens >= 1, "eval.max_tokens", "must be at least 1"),
              (e.generations >= 0, "eval.generations", "must be 0 or more"),
              (0 < e.timeout_seconds <= 86400, "eval.timeout_seconds", "must be positive and at most 86400 (a day)"),
              (64 <= e.memory_mb <= 2 ** 20, "eval.memory_mb",
               "must be at least 64 (Python itself needs some) and at most 1048576 (1 TB)")]
    return number_problems("eval", e) + [f"{where}: {message}" for ok, where, message in checks if not ok]


def setting_help(cls, name: str) -> str:
    """The help text of one setting, for command-line options that override it."""
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


def parse_json_file(path: str | Path, what: str = "config") -> Any:
    """Read a JSON file, turning every way it can fail into one line naming file, line and column."""
    path = Path(path)
    return parse_user_json(read_user_text(path, what), path)


def load_config(path: str | Path) -> RunConfig:
    """Load and check a config file; relative data and model paths are taken from the file's folder."""
    path = Path(path)
    if path.suffix == ".jsonl":
        raise UserError(f"{path}: a .jsonl file holds examples, not a run config; give a config .json (copy "
                        "configs/surgical.json) and name this file in its data.train")
    config = config_from_dict(parse_json_file(path), source=str(path), base_dir=path.parent)
    return resolve_model_path(resolve_data_paths(config, path.parent), path.parent)


def resolve_model_path(config: RunConfig, base_dir: str | Path) -> RunConfig:
    """A relative model.path that exists from the working directory stays as it is (as before);
    otherwise one that exists beside the config file is taken from there, like data paths.
    Anything else is left for model.py to report (or to find on the Hugging Face Hub)."""
    given = Path(config.model.path).expanduser()
    if not given.is_absolute() and not given.exists() and (Path(base_dir) / given).exists():
        config.model.path = str((Path(base_dir) / given).resolve())
    return config


BUNDLED_PREFIX = "bundled:"  # "bundled:train" names a split of the sample data shipped in the package


def data_path_problem(value: str, where: str) -> Optional[str]:
    """What is wrong with a data file's name as given, before it is looked for."""
    if "\0" in value:
        return f"{where}: the path contains a NUL character; give the file's name as plain text"
    split = value[len(BUNDLED_PREFIX):] if value.startswith(BUNDLED_PREFIX) else None
    if split is not None and split not in SAMPLE_SPLITS:
        return f"{where}: unknown bundled split '{split}'; use " + ", ".join(BUNDLED_PREFIX + s for s in SAMPLE_SPLITS)
    return None


def missing_data_files(config: RunConfig, source: str, base_dir: Path) -> list[str]:
    """The config's data files that do not exist (names with other problems are reported by value_problems)."""
    problems = []
    for name in ("train", "valid"):
        value = getattr(config.data, name)
        if not isinstance(value, str) or value.startswith(BUNDLED_PREFIX) or data_path_problem(value, name):
            continue
        path = Path(value) if Path(value).is_absolute() else (Path(base_dir) / value).resolve()
        if not path.exists():
            problems.append(f"{source}: data.{name}: {path}: data file not found (a relative path is taken from the "
                            "config file's folder)")
    return problems


def resolve_data_path(value: str, base_dir: str | Path, where: str) -> str:
    """A data file as named in a config or on the command line: bundled:SPLIT, or a path taken
    from base_dir when relative."""
    if problem := data_path_problem(value, where):
        raise UserError(problem)
    if value.startswith(BUNDLED_PREFIX):
        return str(sample_path(value[len(BUNDLED_PREFIX):]))
    return value if Path(value).is_absolute() else str((Path(base_dir) / value).resolve())


def resolve_data_paths(config: RunConfig, base_dir: str | Path) -> RunConfig:
    """Make data paths absolute: relative ones are taken from base_dir (the config's folder)."""
    for name in ("train", "valid"):
        value = getattr(config.data, name)
        if value is not None:
            setattr(config.data, name, resolve_data_path(value, base_dir, f"data.{name}"))
    return config


def preset_path(name: str) -> Path:
    """A preset shipped with the package (the files in the repository's configs/)."""
    path = Path(str(resources.files("mlx_surgical.presets") / f"{name}.json"))
    if not path.exists():
        raise UserError(f"preset '{name}' not found; presets: " + ", ".join(preset_names()))
    return path


def preset_names() -> list[str]:
    return sorted(Path(str(p)).stem for p in resources.files("mlx_surgical.presets").iterdir()
                  if str(p).endswith(".json"))


def save_config(config: RunConfig, path: str | Path) -> None:
    write_json_atomic(path, config.to_dict())


def settings_help() -> dict[str, dict[str, dict]]:
    """Every setting's default, help text and (for closed choices) the values it takes, by section:
    for `config-help` and the dashboard's form."""
    described = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        described[section] = {}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            closed = typing.get_origin(hints[f.name]) is Literal
            choices = (list(PROJECTION_PATHS) if f.name == "target_modules"
                       else list(typing.get_args(hints[f.name])) if closed else None)
            described[section][f.name] = {"default": default, "help": f.metadata["help"], "choices": choices}
    return described


def help_lines() -> list[str]:
    """Every setting with its default and help text, for `mlx-surgical config-help`."""
    lines = []
    for section, settings in settings_help().items():
        lines.append(f"[{section}]")
        for name, setting in settings.items():
            lines.append(f"  {name} = {json.dumps(setting['default'])}\n      {setting['help']}")
    return lines
