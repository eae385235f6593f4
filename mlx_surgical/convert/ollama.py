"""Find the GGUF file of a model Ollama has pulled, through its local manifests.

Ollama keeps models under ~/.ollama/models (or $OLLAMA_MODELS) as a manifest per name and
tag, manifests/<registry>/<namespace>/<model>/<tag>, whose layer of media type
application/vnd.ollama.image.model names the GGUF blob, blobs/sha256-<hex>. `codellama`
is registry.ollama.ai/library/codellama:latest; `me/coder:7b` is in namespace `me`;
`hf.co/org/repo:Q4_K_M` names its registry.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

PREFIX = "ollama:"
DEFAULT_REGISTRY, DEFAULT_NAMESPACE, DEFAULT_TAG = "registry.ollama.ai", "library", "latest"
MODEL_LAYER = "application/vnd.ollama.image.model"
ADAPTER_LAYER = "application/vnd.ollama.image.adapter"


@dataclass(frozen=True)
class OllamaModel:
    name: str  # as the user wrote it, without the prefix
    manifest: Path
    blob: Path
    digest: str  # sha256:<hex>

    @property
    def short_name(self) -> str:
        """A directory name: codellama:7b-instruct -> codellama-7b-instruct."""
        return self.name.rsplit("/", 1)[-1].replace(":", "-")


def models_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def manifest_path(root: Path, name: str) -> Path:
    model, _, tag = name.partition(":")
    parts = [p for p in model.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts) or "/" in tag or tag in (".", ".."):
        raise UserError(f"ollama:{name}: not a model name; write ollama:NAME[:TAG], e.g. ollama:codellama:7b-instruct")
    if len(parts) == 1:
        parts = [DEFAULT_REGISTRY, DEFAULT_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_REGISTRY, *parts]
    return root.joinpath("manifests", *parts, tag or DEFAULT_TAG)


def find_model(name: str) -> OllamaModel:
    """The GGUF blob of `name` ("codellama:7b-instruct"); a UserError says what is missing."""
    root = models_root()
    manifest = manifest_path(root, name)
    if not manifest.exists():
        where = "$OLLAMA_MODELS" if os.environ.get("OLLAMA_MODELS") else "~/.ollama/models"
        raise UserError(f"ollama:{name}: no manifest at {manifest}; pull it with `ollama pull {name}` "
                        f"(or set OLLAMA_MODELS if Ollama keeps its models elsewhere than {where})")
    try:
        layers = json.loads(manifest.read_text())["layers"]
        digests = [layer["digest"] for layer in layers if layer.get("mediaType") == MODEL_LAYER]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{manifest}: not an Ollama manifest ({type(e).__name__}: {e})") from None
    if not digests:
        raise UserError(f"{manifest}: has no layer of media type {MODEL_LAYER}")
    if any(layer.get("mediaType") == ADAPTER_LAYER for layer in layers):
        raise UserError(f"ollama:{name}: already carries an adapter (ADAPTER in its Modelfile); convert the model "
                        "it was built FROM instead")
    blob = root / "blobs" / digests[0].replace(":", "-")
    if not blob.exists():
        raise UserError(f"ollama:{name}: the model blob {blob} is missing; pull it again with `ollama pull {name}`")
    return OllamaModel(name, manifest, blob, digests[0])
