"""What the adapter learned: response-token loss and perplexity on held-out examples.

The loss is the training loss itself (`loss.training_loss` on `batches.collate` batches), taken
one example at a time so that every figure can be regrouped by concept afterwards.
"""

import math
from dataclasses import dataclass
from typing import Iterable

import mlx.core as mx

from ..batches import collate
from ..loss import training_loss
from ..prompt import Sample


@dataclass
class LossFigure:
    loss_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))  # a random model's loss must not overflow the report

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens}


def example_losses(model, samples: list[Sample], max_seq_length: int) -> list[tuple[float, int]]:
    """(summed loss, learned tokens) of each sample, in order."""
    loss_fn = training_loss(model)
    results = []
    for sample in samples:
        total, count = loss_fn(model, *map(mx.array, collate([sample], max_seq_length).loss_inputs()))
        mx.eval(total, count)
        results.append((total.item(), int(count.item())))
    return results


def combine(per_example: list[tuple[float, int]], indices: Iterable[int]) -> LossFigure:
    chosen = [per_example[i] for i in indices]
    return LossFigure(sum(s for s, _ in chosen), sum(n for _, n in chosen))
