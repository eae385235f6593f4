"""A trained adapter as the exporters see it: LoRA pairs per layer and projection, in float32
numpy, with the settings needed to reproduce its effect (rank, alpha, scale, layers)."""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..model import ModelShape
from ..surgery import ADAPTER_CONFIG, ADAPTER_FILE

# "model.layers.3.self_attn.q_proj.lora_a" -> (3, "self_attn.q_proj", "lora_a")
PREFIX = "model.layers."


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
    directory: Path
    config: dict
    pairs: list[LoraPair]

    @property
    def rank(self) -> int:
        return int(self.config["lora_parameters"]["rank"])

    @property
    def scale(self) -> float:
        return float(self.config["lora_parameters"]["scale"])

    @property
    def alpha(self) -> float:
        """mlx-lm keeps only scale; alpha = scale x rank gives other tools the same update."""
        return float(self.config.get("lora_alpha") or self.scale * self.rank)

    @property
    def layers(self) -> list[int]:
        return sorted({p.layer for p in self.pairs})

    @property
    def projections(self) -> list[str]:
        return sorted({p.projection for p in self.pairs}, key=lambda n: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "gate_proj", "up_proj", "down_proj"].index(n))

    @property
    def base_model(self) -> str:
        return self.config.get("base_model", {}).get("path", "")

    @property
    def local_base_model(self) -> str:
        """Where the base was on disk when training ran (a relative path in the config is
        relative to wherever training was started), else the recorded path or repo id."""
        recorded = self.config.get("base_model", {})
        resolved = recorded.get("resolved_path")
        return resolved if resolved and Path(resolved).exists() else self.base_model

    def base_shape(self) -> ModelShape:
        """The base model's shape as recorded at training time, else read from the base model."""
        recorded = self.config.get("base_model", {}).get("config")
        if recorded:
            return ModelShape(**recorded)
        from ..model import model_shape

        return model_shape(self.local_base_model)


def read_adapter(directory: str | Path) -> Adapter:
    import mlx.core as mx

    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_FILE
    if not config_path.exists() or not weights_path.exists():
        raise UserError(f"{directory}: not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_FILE})")
    config = json.loads(config_path.read_text())
    if config.get("fine_tune_type", "lora") != "lora":
        raise UserError(f"{config_path}: only LoRA adapters can be exported (found {config.get('fine_tune_type')})")
    halves: dict[tuple[int, str], dict] = {}
    for name, value in mx.load(str(weights_path)).items():
        if not name.startswith(PREFIX) or not name.endswith((".lora_a", ".lora_b")):
            raise UserError(f"{weights_path}: unexpected tensor {name}; expected model.layers.N.<module>.lora_a/b")
        layer, rest = name[len(PREFIX):].split(".", 1)
        module, half = rest.rsplit(".", 1)
        halves.setdefault((int(layer), module), {})[half] = np.array(value.astype(mx.float32))
    pairs = [LoraPair(layer, module, h["lora_a"], h["lora_b"]) for (layer, module), h in sorted(halves.items())]
    if not pairs:
        raise UserError(f"{weights_path}: holds no LoRA tensors")
    return Adapter(directory, config, pairs)


def refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; choose another --out or pass --force to replace it")


@contextmanager
def staged_file(out: Path):
    """A temporary path beside `out`, renamed onto it only when the writer finished."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        yield Path(name)
        os.replace(name, out)
    finally:
        Path(name).unlink(missing_ok=True)


@contextmanager
def staged_directory(out: Path):
    """Build an output directory beside its destination and move it into place only when
    complete, so a failed export never leaves half a directory (or destroys the old one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.rename(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
