"""provenance.json: where a converted model came from. `convert` writes it into the model
directory; training and the PEFT export read it to name the original Hugging Face model.

Nothing here imports MLX.
"""

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

from .files import read_json_or_empty, write_json_atomic

PROVENANCE = "provenance.json"


@dataclass
class Provenance:
    source: Optional[str] = None  # as given to convert: a repo id, a local directory, a GGUF file or ollama:NAME
    local_source: Optional[str] = None  # the Hugging Face directory it was read from, absolute
    revision: Optional[str] = None  # the hub commit, for a repo id
    bits: Optional[int] = None
    group_size: Optional[int] = None
    dtype: Optional[str] = None
    converted_with: Optional[str] = None
    created: Optional[str] = None
    # From a GGUF file: file, sha256, size_bytes, quantization (llama.cpp's file type), tensor_types
    # ({type: count}), tensors_kept_quantized, and for an Ollama model ollama_manifest, ollama_digest.
    gguf: Optional[dict] = None

    def write(self, model_dir: Path) -> None:
        write_json_atomic(Path(model_dir) / PROVENANCE, asdict(self))

    @property
    def hugging_face_model(self) -> Optional[str]:
        """What transformers' from_pretrained takes for the original: the repo id when it was
        converted from the hub (read from the hub cache), else the local Hugging Face
        directory it was read from, when that still exists."""
        if self.source and self.local_source and is_hub_snapshot(Path(self.local_source)):
            return self.source
        if self.local_source and (Path(self.local_source) / "config.json").exists():
            return str(Path(self.local_source).resolve())
        return None


def is_hub_snapshot(path: Path) -> bool:
    """A directory of the Hugging Face cache: .../models--owner--name/snapshots/<commit>."""
    return path.parent.name == "snapshots"


def read_provenance(model_dir: Path) -> Provenance:
    """The record of a converted model; empty for any other directory (or an unreadable record)."""
    raw = read_json_or_empty(Path(model_dir) / PROVENANCE)
    return Provenance(**{f.name: raw.get(f.name) for f in fields(Provenance)})
