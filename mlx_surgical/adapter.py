"""The adapter on disk: `adapters.safetensors` + `adapter_config.json`, in mlx-lm's own format,
so `mlx_lm.generate --adapter-path` loads a run directory (or an mlx export) as it is.

The config also carries what mlx-lm ignores and other consumers need: `lora_alpha` (PEFT and
llama.cpp think in alpha, mlx-lm keeps only scale = alpha / rank), the base model's
fingerprint and shape (so an adapter is never applied to another base), and the prompt
format it was trained with (so generation prompts the same way). This module is the one
place that writes and reads both files; surgery.py attaches adapters to a model in memory.
Nothing here imports MLX: weights are read and written as numpy arrays.
"""

import math
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .config import DataConfig, LoraConfig
from .errors import UserError, parse_user_json, read_user_text
from .files import staged_file, write_json_atomic
from .rundir import ADAPTER_CONFIG, ADAPTER_FILE, from_json, require_directory
from .shape import FINGERPRINT_KEYS, PROJECTION_PATHS, PROJECTIONS, ModelShape, local_shape

LAYER_PREFIX = "model.layers."  # "model.layers.3.self_attn.q_proj.lora_a"


@dataclass
class BaseModelRecord:
    """The base model an adapter was trained on."""

    path: str  # as the config gave it: a repo id or a path relative to where training ran
    resolved_path: str  # where it was on disk when training ran
    fingerprint: str
    shape: str  # ModelShape.describe()
    num_layers: int
    config: dict  # ModelShape's fields

    def model_shape(self) -> ModelShape:
        return ModelShape(**self.config)


@dataclass
class PromptRecord:
    """How training wrote and cut its examples, so generation and evaluation do the same."""

    format: str = "auto"
    system_prompt: Optional[str] = None
    max_seq_length: Optional[int] = None  # None in adapters written before it was recorded
    mask_prompt: bool = True


PROMPT_FORMATS = typing.get_args(typing.get_type_hints(DataConfig)["prompt_format"])


@dataclass
class AdapterConfig:
    """adapter_config.json."""

    rank: int
    scale: float
    alpha: float
    dropout: float
    target_modules: list[str]  # short names, in PROJECTIONS order
    num_layers: int  # adapted layers, counted from the last
    base: Optional[BaseModelRecord] = None
    prompt: PromptRecord = field(default_factory=PromptRecord)
    update: Optional[int] = None  # best/ only: the update and validation loss it was saved at
    val_loss: Optional[float] = None

    @classmethod
    def for_run(cls, lora: LoraConfig, shape: ModelShape, base_model: str, resolved_path: str,
                prompt: PromptRecord) -> "AdapterConfig":
        layers = adapted_layer_count(lora, shape.num_layers)
        return cls(rank=lora.rank, scale=lora.scale, alpha=lora.alpha, dropout=lora.dropout,
                   target_modules=[p for p in PROJECTIONS if p in lora.target_modules], num_layers=layers,
                   base=BaseModelRecord(base_model, resolved_path, shape.fingerprint(), shape.describe(),
                                        shape.num_layers, asdict(shape)),
                   prompt=prompt)

    def to_dict(self) -> dict:
        params = lora_parameters(self.rank, self.scale, self.dropout, self.target_modules)
        data = {"fine_tune_type": "lora", "num_layers": self.num_layers, "lora_parameters": params,
                "lora_alpha": self.alpha, "target_modules": self.target_modules,
                "base_model": asdict(self.base) if self.base else None, "prompt": asdict(self.prompt)}
        if self.update is not None:
            data.update(update=self.update, val_loss=self.val_loss)
        return data

    @classmethod
    def from_dict(cls, raw: dict, source: str) -> "AdapterConfig":
        """Our configs, and plain mlx-lm adapter configs (no alpha, base or prompt)."""
        if not isinstance(raw, dict):
            raise UserError(f"{source}: not a LoRA adapter config (a JSON object is expected, found "
                            f"{type(raw).__name__}); train the adapter again or restore the file")
        if raw.get("fine_tune_type", "lora") != "lora":
            raise UserError(f"{source}: only LoRA adapters are supported (found {raw.get('fine_tune_type')})")
        try:
            params = raw["lora_parameters"]
            rank, scale = int(params["rank"]), float(params["scale"])
            keys = params.get("keys") or ["self_attn.q_proj", "self_attn.v_proj"]  # mlx-lm's default
            # Records read back from a file people edit: a wrong type is refused here, not in a table
            # or an exporter; keys a newer version adds to them are left out.
            base = raw.get("base_model")
            if isinstance(base, dict) and base.get("config"):
                base = from_json(base, BaseModelRecord, "base_model", Path(source))
                base.model_shape()  # a damaged shape record fails here too
            else:
                base = None
            config = cls(rank=rank, scale=scale, alpha=float(raw.get("lora_alpha") or scale * rank),
                         dropout=float(params.get("dropout", 0.0)),
                         target_modules=[p for p in PROJECTIONS if PROJECTION_PATHS[p] in keys],
                         num_layers=int(raw["num_layers"]),
                         base=base,
                         prompt=from_json(raw.get("prompt") or {}, PromptRecord, "prompt", Path(source)),
                         update=raw.get("update"), val_loss=raw.get("val_loss"))
        # AttributeError: a list where an object belongs; OverflowError: an infinite rank or layer count
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise UserError(f"{source}: not a LoRA adapter config mlx_surgical can read ({type(e).__name__}: {e})")
        if problems := config._value_problems():
            raise UserError(*(f"{source}: {p}; train the adapter again or restore the file" for p in problems))
        return config

    def _value_problems(self) -> list[str]:
        """Values that read as numbers and strings but that no adapter has: every consumer
        (generation, evaluation, the exporters) would otherwise use them silently."""
        problems = [f"{name} is {value}, not a finite number"
                    for name, value in (("lora_parameters.scale", self.scale), ("lora_alpha", self.alpha),
                                        ("lora_parameters.dropout", self.dropout))
                    if not math.isfinite(value)]
        if self.rank < 1:  # num_layers below 1 is mlx-lm's "every layer" (mlx_lm.lora --num-layers -1)
            problems.append(f"lora_parameters.rank is {self.rank}, not a positive whole number")
        if self.base and self.base.model_shape().fingerprint() != self.base.fingerprint:
            problems.append("base_model.fingerprint does not match the shape recorded beside it")
        if self.prompt.format not in PROMPT_FORMATS:
            problems.append(f"prompt.format is '{self.prompt.format}', not one of {', '.join(PROMPT_FORMATS)}")
        return problems

    @classmethod
    def read(cls, directory: str | Path) -> "AdapterConfig":
        path = Path(directory) / ADAPTER_CONFIG
        if not path.exists():
            raise UserError(f"{directory}: no {ADAPTER_CONFIG}; give a run directory or an mlx export")
        return cls.from_dict(parse_user_json(read_user_text(path, "adapter config"), path), str(path))

    @property
    def base_model(self) -> str:
        return self.base.path if self.base else ""

    @property
    def local_base_model(self) -> str:
        """Where the base was on disk when training ran (a relative path in the config is
        relative to wherever training was started), else the recorded path or repo id."""
        if self.base and self.base.resolved_path and Path(self.base.resolved_path).exists():
            return self.base.resolved_path
        return self.base_model

    def base_shape(self) -> ModelShape:
        """The base model's shape as recorded at training time, else read from the base model."""
        if self.base:
            return self.base.model_shape()
        if not self.base_model or not Path(self.base_model).is_dir():
            raise UserError("this adapter records no base model; name the base model explicitly")
        return local_shape(Path(self.base_model))

    def base_mismatch(self, shape: ModelShape, base_path: str, directory: str | Path) -> Optional[str]:
        """Both models named, when `shape` is not the shape this adapter was trained on."""
        if not self.base or self.base.fingerprint == shape.fingerprint():
            return None
        recorded = self.base.model_shape()
        theirs = shape.describe()
        if theirs == self.base.shape:  # the summary hides what differs (head_dim, intermediate_size)
            theirs += ": " + ", ".join(f"{key} {getattr(shape, key)}, not {getattr(recorded, key)}"
                                       for key in FINGERPRINT_KEYS if getattr(recorded, key) != getattr(shape, key))
        return (f"{directory}: this adapter was trained on {self.base.path} ({self.base.shape}), "
                f"not on {base_path} ({theirs}); use the base model it was trained on")

    def check_fits(self, shape: ModelShape, base_path: str, directory: str | Path) -> None:
        """Refuse, naming both models, to apply this adapter to a base of another shape."""
        if mismatch := self.base_mismatch(shape, base_path, directory):
            raise UserError(mismatch)
        if self.num_layers > shape.num_layers:
            raise UserError(f"{directory}: the adapter covers {self.num_layers} layers but {base_path} "
                            f"has {shape.num_layers}; use the base model it was trained on")


def lora_parameters(rank: int, scale: float, dropout: float, target_modules: list[str]) -> dict:
    """The `lora_parameters` block of mlx-lm's adapter config; mlx-lm scales by `scale` alone."""
    return {"rank": rank, "scale": scale, "dropout": dropout,
            "keys": [PROJECTION_PATHS[t] for t in PROJECTIONS if t in target_modules]}


def lora_problems(lora: LoraConfig, shape: ModelShape, model_path: str) -> list[str]:
    """What in the lora section cannot apply to this model."""
    problems = []
    if lora.layers != "all" and lora.layers > shape.num_layers:
        problems.append(f"lora.layers: {lora.layers}, but {model_path} has {shape.num_layers} layers; "
                        f"use at most {shape.num_layers} (or 'all')")
    smallest = min((min(shape.projection_dims(p)) for p in lora.target_modules if p in PROJECTIONS), default=None)
    if smallest is not None and lora.rank > smallest:
        problems.append(f"lora.rank: {lora.rank} exceeds the smallest adapted projection of {model_path} "
                        f"({smallest} features); a LoRA rank is at most that, and usually 4 to 64")
    return problems


def adapted_layer_count(lora: LoraConfig, num_layers: int) -> int:
    return num_layers if lora.layers == "all" else min(int(lora.layers), num_layers)


@dataclass
class LoraPair:
    layer: int
    module: str  # "self_attn.q_proj"
    a: np.ndarray  # mlx-lm orientation: (in, r)
    b: np.ndarray  # mlx-lm orientation: (r, out)

    @property
    def projection(self) -> str:
        return self.module.rsplit(".", 1)[-1]

    def delta(self, scale: float) -> np.ndarray:
        """The weight update in (out, in) orientation: scale * B^T A^T."""
        return scale * (self.b.T @ self.a.T)


@dataclass
class Adapter:
    """An adapter directory read back: its config and its LoRA pairs as float32 numpy."""

    directory: Path
    config: AdapterConfig
    pairs: list[LoraPair]

    @property
    def layers(self) -> list[int]:
        return sorted({p.layer for p in self.pairs})

    @property
    def projections(self) -> list[str]:
        present = {p.projection for p in self.pairs}
        return [p for p in PROJECTIONS if p in present]

    def fit_problems(self, shape: ModelShape, base: str) -> list[str]:
        """What does not fit a base model of `shape`, one line per kind of mismatch with the
        layers it affects (an adapter for another model would otherwise give one per tensor)."""
        rank = self.config.rank
        layers_by_problem: dict[str, list[int]] = {}
        for p in self.pairs:
            if p.projection not in PROJECTIONS:
                problem = f"{p.module} is not a projection mlx_surgical adapts"
            elif p.layer >= shape.num_layers:
                problem = f"beyond the last layer of {base} ({shape.num_layers} layers)"
            else:
                expected_in, expected_out = shape.projection_dims(p.projection)
                if p.a.shape == (expected_in, rank) and p.b.shape == (rank, expected_out):
                    continue
                problem = (f"{p.module} has A {p.a.shape}, B {p.b.shape}; {base} needs A ({expected_in}, {rank}), "
                           f"B ({rank}, {expected_out})")
            layers_by_problem.setdefault(problem, []).append(p.layer)
        return [f"{self.directory}: {layer_span(layers)}: {problem}" for problem, layers in layers_by_problem.items()]


def layer_span(layers: list[int]) -> str:
    """'layer 3', 'layers 6-29', 'layers 0, 2, 4'."""
    layers = sorted(set(layers))
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}"
    return "layers " + ", ".join(map(str, layers))


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).exists() and (path / ADAPTER_FILE).exists()


def write_adapter(directory: str | Path, weights: dict, config: AdapterConfig) -> None:
    """Both files, each replaced atomically. `weights` maps mlx-lm parameter names to arrays
    (MLX or numpy)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with staged_file(directory / ADAPTER_FILE) as tmp:
        save_file({k: np.asarray(v) for k, v in weights.items()}, str(tmp), metadata={"format": "mlx"})
    write_json_atomic(directory / ADAPTER_CONFIG, config.to_dict())


def read_adapter(directory: str | Path) -> Adapter:
    directory = require_directory(directory)
    weights_path = directory / ADAPTER_FILE
    if not is_adapter_dir(directory):
        raise UserError(f"{directory}: not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_FILE})")
    config = AdapterConfig.read(directory)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise UserError(f"{weights_path}: cannot be read ({e}); the file is damaged") from None
    damaged = sorted(name for name, value in tensors.items() if not np.isfinite(value).all())
    if damaged:
        raise UserError(f"{weights_path}: {', '.join(damaged[:3])}{' and more' if len(damaged) > 3 else ''} hold NaN "
                        "or infinite values (the training diverged); use the best/ adapter or an earlier checkpoint")
    halves: dict[tuple[int, str], dict] = {}
    for name, value in tensors.items():
        layer, _, rest = name[len(LAYER_PREFIX):].partition(".")
        module, _, half = rest.rpartition(".")
        if not name.startswith(LAYER_PREFIX) or not layer.isdigit() or half not in ("lora_a", "lora_b") \
                or value.ndim != 2:
            raise UserError(f"{weights_path}: unexpected tensor {name} {value.shape}; "
                            "expected 2-D model.layers.N.<module>.lora_a/b")
        halves.setdefault((int(layer), module), {})[half] = value.astype(np.float32)
    incomplete = [f"layer {layer} {module}" for (layer, module), h in halves.items() if len(h) != 2]
    if incomplete:
        raise UserError(f"{weights_path}: LoRA pairs missing a half: {', '.join(incomplete)}")
    pairs = [LoraPair(layer, module, h["lora_a"], h["lora_b"]) for (layer, module), h in sorted(halves.items())]
    if not pairs:
        raise UserError(f"{weights_path}: holds no LoRA tensors")
    adapter = Adapter(directory, config, pairs)
    if config.base:  # a damaged file must not reach an exporter as odd shapes
        problems = adapter.fit_problems(config.base.model_shape(), config.base.path)
        if problems:
            raise UserError(*problems)
    return adapter
