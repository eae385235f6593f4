"""Find and load a base model: a local directory or a Hugging Face repo id.

Loading goes through mlx-lm (`mlx_lm.utils.load`), which reads both MLX and Hugging Face
layouts and quantized weights. Before it, `inspect_model_dir` checks what can be checked from
the files alone (config.json, the Llama family, the safetensors headers, the tokenizer files),
so `validate` finds the same problems `train` would and neither shows a traceback.
"""

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError
from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS, load
from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer
from safetensors import SafetensorError, safe_open

from .backend import training_dtype
from .config import parse_json_file, preset_path
from .errors import UserError, similar_name
from .shape import ModelShape, local_shape, read_model_config

WEIGHTS_GLOB = "model*.safetensors"  # what mlx-lm loads
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def looks_like_local_path(path: str) -> bool:
    """A path rather than a Hugging Face repo id ("namespace/name"): absolute, starting with ./ ../ ~,
    under models/ (where `convert` writes), or with more than one folder level."""
    return (path.startswith(("/", "./", "../", "~", ".\\")) or "\\" in path or path.endswith("/")
            or path.split("/")[0] == "models" or path.count("/") > 1)


# The Hugging Face sources of the presets' converted folders, so a missing one is named with its command.
PRESET_SOURCES = {"CodeLlama-7b-Instruct-hf": "codellama/CodeLlama-7b-Instruct-hf"}
# The presets whose model folder the quickstart makes, and how it is asked to.
QUICKSTART_PRESETS = {"tiny": ["quickstart"], "smollm2": ["quickstart", "--real"]}


def converted_folder(name: str, bits: Optional[int], dtype: str) -> Path:
    """Where `convert` writes a model by default: models/<name>-4bit, -8bit, or -<dtype> unquantized."""
    return Path("models") / (f"{name}-{bits}bit" if bits else f"{name}-{dtype}")


def how_to_create(path: str) -> str:
    """The command that makes the model folder `path`, as a hint for when it is missing."""
    name = Path(path).name
    path = str(Path(path).expanduser())  # quoted below, so the shell would not expand ~
    for preset, command in QUICKSTART_PRESETS.items():
        if name == Path(parse_json_file(preset_path(preset))["model"]["path"]).name:
            return (f"run `{shlex.join(['mlx-surgical', *command, '--model-dir', path])}` once: it builds that "
                    "folder, then trains its short demo")
    stem, options = name, []
    if match := re.fullmatch(r"(.+)-(?:([48])bit|(float32|float16|bfloat16))", name):
        stem, bits, dtype = match.groups()
        options = (["--bits", "none", "--dtype", dtype] if dtype else [] if bits == "4" else ["--bits", bits])
    tail = shlex.join([*options, "--out", path])
    if stem in PRESET_SOURCES:
        return f"create it with `mlx-surgical convert {PRESET_SOURCES[stem]} {tail}`"
    return f"create it with `mlx-surgical convert SOURCE {tail}` (SOURCE: its Hugging Face repo id or GGUF file)"


def local_model_dir(path: str, revision: Optional[str] = None, download: bool = True,
                    where: str = "model.path") -> Path:
    """A local directory for `path`: itself when it exists, else a Hugging Face snapshot.
    With download=False only an already-cached snapshot is used. `where` names the setting or
    option `path` came from, in errors."""
    if is_local(path):
        local = Path(path).expanduser()
        if not local.is_dir():
            raise UserError(f"{where}: {path} is a file; give the model's folder (the one holding config.json)")
        return local
    if looks_like_local_path(path):
        lookup = (" (a relative path is looked up from the working directory, then from the config file's folder)"
                  if where == "model.path" else "")
        if meant := similar_name(Path(path).expanduser()):
            raise UserError(f"{where}: the model folder {path} does not exist{lookup}; did you mean {meant}?")
        raise UserError(f"{where}: the model folder {path} does not exist{lookup}; {how_to_create(path)}")
    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=DEFAULT_ALLOW_PATTERNS,
                                      local_files_only=not download))
    except HFValidationError:
        raise UserError(f"{where}: '{path}' is neither a local directory nor a Hugging Face repo id") from None
    except Exception as e:  # offline, missing repo, gated model: all end the same way for the user
        how = "download it first or give a local directory" if not download else "check the name and your network"
        raise UserError(f"{where}: cannot get '{path}' from the Hugging Face Hub ({type(e).__name__}); {how}") from None


def mlx_lm_rope(config: dict, source: str) -> dict:
    """The RoPE settings in the form mlx-lm reads (`rope_theta`, `rope_scaling`) that `config`
    lacks. transformers 5 writes only `rope_parameters`, which mlx-lm 0.32 ignores: it would
    silently rotate with theta 10,000 (SmolLM2 needs 100,000, CodeLlama 1,000,000). Returns
    {} when nothing is missing; refuses a config whose two forms disagree."""
    params = config.get("rope_parameters")
    if not params:
        return {}
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise UserError(f"{source}: rope_parameters has no rope_theta; state rope_theta in config.json")
    theta = float(params["rope_theta"])
    rope_type = params.get("rope_type", "default")
    scaling = None if rope_type == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
    if "rope_theta" in config and float(config["rope_theta"]) != theta:
        raise UserError(f"{source}: rope_theta {config['rope_theta']} disagrees with rope_parameters.rope_theta "
                        f"{theta:g}; remove one of them")
    stated = config.get("rope_scaling")
    if stated is not None:
        stated_type = stated.get("rope_type", stated.get("type"))
        if stated_type != rope_type or stated.get("factor") != params.get("factor"):
            raise UserError(f"{source}: rope_scaling {json.dumps(stated)} disagrees with rope_parameters "
                            f"{json.dumps(params)}; remove one of them")
    fixes = {} if "rope_theta" in config else {"rope_theta": theta}
    if scaling is not None and stated is None:
        fixes["rope_scaling"] = scaling
    return fixes


def with_mlx_lm_rope(config: dict, source: str) -> dict:
    """`config` with its RoPE settings stated as mlx-lm reads them (for every config we write)."""
    return {**config, **mlx_lm_rope(config, source)}


def safetensors_problem(path: Path) -> Optional[str]:
    """Why a safetensors file is not whole, from its header alone (no tensor is read):
    safetensors checks that the header parses and that its tensors cover the file exactly."""
    try:
        with safe_open(str(path), "numpy"):
            return None
    except SafetensorError as e:
        return f"it is not a whole safetensors file (truncated or damaged: {e})"


def inspect_model_dir(model_dir: Path) -> ModelShape:
    """The shape of a local model directory, after checking config.json (Llama family), that the
    weight files are whole and that tokenizer files are present. Raises UserError listing every
    problem."""
    shape = local_shape(model_dir)
    problems = []
    try:  # RoPE stated in both of transformers' forms, differently: found by validate, not only by loading
        mlx_lm_rope(read_model_config(model_dir), str(model_dir / "config.json"))
    except UserError as e:
        problems += e.problems
    weights = sorted(model_dir.glob(WEIGHTS_GLOB))
    if not weights:
        problems.append(f"{model_dir}: no weights ({WEIGHTS_GLOB}); give an MLX or Hugging Face model directory "
                        "(`mlx-surgical convert` writes one)")
    for path in weights:
        problem = safetensors_problem(path)
        if problem:
            problems.append(f"{path}: {problem}; convert or download the model again")
    if not any((model_dir / name).exists() for name in TOKENIZER_FILES):
        problems.append(f"{model_dir}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy them from the "
                        "original model")
    if problems:
        raise UserError(*problems)
    return shape


def model_shape(path: str, revision: Optional[str] = None, download: bool = False) -> ModelShape:
    """The shape from config.json alone, without loading weights."""
    return local_shape(local_model_dir(path, revision, download=download))


def quiet_tokenizer(tokenizer):
    """Lengths are checked against training.max_seq_length by prompt.py; transformers' own warning
    about the model's nominal maximum would only confuse."""
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def load_tokenizer(path: str, revision: Optional[str] = None):
    model_dir = local_model_dir(path, revision, download=False)
    try:
        return quiet_tokenizer(mlx_load_tokenizer(model_dir))
    except Exception as e:  # transformers raises many kinds for damaged or foreign tokenizer files
        raise UserError(f"{model_dir}: the tokenizer cannot be loaded ({type(e).__name__}: {e})") from None


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    shape: ModelShape
    path: Path


def load_model(path: str, revision: Optional[str] = None, dtype: Optional[str] = "auto",
               where: str = "model.path") -> LoadedModel:
    """Load weights and tokenizer with mlx-lm, after the checks of inspect_model_dir, with RoPE
    settings that only transformers 5's form states passed to mlx-lm as it reads them.
    `dtype` is a model.dtype setting (training, evaluation and generation compute alike), or
    None to keep the stored dtype (a fused export writes the base's own)."""
    model_dir = local_model_dir(path, revision, download=True, where=where)
    shape = inspect_model_dir(model_dir)
    config = read_model_config(model_dir)
    try:
        model, tokenizer = load(str(model_dir), model_config=mlx_lm_rope(config, str(model_dir / "config.json")))
    except (ValueError, RuntimeError, OSError) as e:  # weights that do not fit the config, unreadable files
        raise UserError(f"{model_dir}: the model cannot be loaded ({type(e).__name__}: {e})") from None
    dtype = training_dtype(dtype) if dtype else None
    if dtype and dtype != "auto":
        model.set_dtype(getattr(mx, dtype))
    return LoadedModel(model, quiet_tokenizer(tokenizer), shape, model_dir)
