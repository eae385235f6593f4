"""provenance.json: where a converted model came from. `convert` writes it into the model
directory; training and the PEFT export read it to name the original Hugging Face model.

Nothing here imports MLX.
"""

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

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
        (Path(model_dir) / PROVENANCE).write_text(json.dumps(asdict(self), indent=2) + "\n")

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
    try:
        raw = json.loads((Path(model_dir) / PROVENANCE).read_text())
    except (OSError, ValueError):
        return Provenance()
    if not isinstance(raw, dict):
        return Provenance()
    return Provenance(**{f.name: raw.get(f.name) for f in fields(Provenance)})
