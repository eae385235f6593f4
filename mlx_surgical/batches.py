"""Batches: the data order of every epoch, padding to length buckets (so the compiled step
sees few shapes), and the arrays a micro-batch hands to the loss."""

from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .prompt import Sample


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
