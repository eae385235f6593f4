"""What the adapter disturbed: loss on general text and KL divergence from the base model.

Both use texts shipped in `reference/`, written for this project: English prose and Python
code (passages separated by two blank lines), and neutral instruction/response pairs. The
reference loss is taken on every token of each passage. The KL divergence KL(base || adapted)
of the next-token distributions is averaged over the answer positions of the neutral pairs;
a zero adapter leaves every logit bit for bit unchanged and scores exactly 0.
"""

from importlib import resources
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..data import Record, read_records
from ..prompt import Sample
from ..surgery import base_only

REFERENCE_KINDS = ("prose", "code")


def _reference_dir() -> Path:
    return Path(str(resources.files("mlx_surgical.eval.reference")))


def reference_records() -> list[Record]:
    """Each passage of the reference texts as a plain-text example, its kind as the concept."""
    records = []
    for kind in REFERENCE_KINDS:
        path = _reference_dir() / f"{kind}.txt"
        passages = [p.strip("\n") for p in path.read_text(encoding="utf-8").split("\n\n\n") if p.strip()]
        records += [Record({"text": p, "concept": kind}, f"{path}[{i}]") for i, p in enumerate(passages)]
    return records


def neutral_records() -> list[Record]:
    return read_records(_reference_dir() / "neutral.jsonl")


def _log_probs(model, inputs: mx.array, positions: mx.array) -> mx.array:
    logits = model(inputs)[0, positions].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def example_kl(model, samples: list[Sample]) -> list[tuple[float, int]]:
    """(summed KL(base || adapted) in nats, positions) per sample, over its answer positions."""
    results = []
    for sample in samples:
        inputs = mx.array(sample.ids[None, :-1])
        positions = mx.array(np.arange(max(sample.loss_start - 1, 0), len(sample.ids) - 1))
        adapted = _log_probs(model, inputs, positions)
        with base_only(model):
            base = _log_probs(model, inputs, positions)
        kl = (mx.exp(base) * (base - adapted)).sum()
        results.append((kl.item(), int(positions.size)))
    return results
