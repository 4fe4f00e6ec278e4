"""What every store loader shares: epochs, realised counts, adaptive updates, exact resumption.

`for batch in loader` is one epoch. The map-style loader (`mapstyle.StoreLoader`) and the streaming
loader (`streaming.StreamLoader`) differ only in how an epoch's batches are produced
(`_epoch_batches`); everything a trainer touches between epochs lives here once:

- the epoch advances when a pass runs to its end; the policy's pending adaptive updates are applied
  when the next epoch starts, in this process, before DataLoader workers copy the policy;
- `metrics()` / `epoch_counts`: realised draws per variant of the epoch under way (or the last one);
- `update(errors)`: per-variant error rates for adaptive mode; under torch.distributed they are
  averaged over ranks first, so every rank keeps the same policy;
- `state_dict()` / `load_state_dict()`: a JSON-serialisable position that counts the batches the
  consumer received (not what workers prefetched). A state saved after the last batch of an epoch
  resumes at the start of the next epoch.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np
import torch

from advpipe.batch import Batch
from advpipe.errors import SamplerError
from advpipe.sampler.policy import Policy

log = logging.getLogger(__name__)


class EpochLoader(ABC):
    """Base of the store loaders; subclasses provide `policy`, `__len__`, `layout` and `_epoch_batches`."""

    policy: Policy

    def __init__(self, variant_names: list[str]) -> None:
        self.variant_names = list(variant_names)
        self.epoch = 0
        self._consumed = 0  # batches of `epoch` the consumer has received
        self._adapted_epoch: int | None = None  # the epoch whose start applied policy.adapt()
        self._counts = np.zeros(len(self.variant_names), dtype=np.int64)

    @abstractmethod
    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""

    @abstractmethod
    def layout(self) -> dict:
        """What must match for a saved position to mean the same batches (seed, batch size, ranks...)."""

    @abstractmethod
    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        """The batches of `epoch` after its first `skip`, exactly as an uninterrupted pass yields them."""

    def __iter__(self) -> Iterator[Batch]:
        if self._consumed >= len(self):  # the consumer took the last batch but stopped before the end
            self._finish_epoch()
        if self._adapted_epoch != self.epoch:
            self.policy.adapt()
            self._adapted_epoch = self.epoch
        if self._consumed == 0:
            self._counts[:] = 0
        for batch in self._epoch_batches(self.epoch, self._consumed):
            self._consumed += 1
            self._counts += np.bincount(np.atleast_1d(batch.variant.numpy()), minlength=len(self._counts))
            yield batch
        self._finish_epoch()

    def _finish_epoch(self) -> None:
        log.info("sampler epoch %d: realised variant counts %s (adversarial fraction %.3f)",
                 self.epoch, self.epoch_counts, self.adversarial_fraction)
        self._consumed = 0
        self.epoch += 1

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch at the next iteration."""
        if int(epoch) != self.epoch:
            self.epoch, self._consumed = int(epoch), 0

    # counts -------------------------------------------------------------------------------------

    @property
    def epoch_counts(self) -> dict[str, int]:
        """Realised count of each variant (clean first) in the epoch under way, or the last one finished."""
        return {name: int(count) for name, count in zip(self.variant_names, self._counts, strict=True)}

    @property
    def adversarial_fraction(self) -> float:
        total = int(self._counts.sum())
        return float(self._counts[1:].sum() / total) if total else 0.0

    def metrics(self) -> dict[str, float]:
        """For a trainer's metrics: `sampler/<variant>` counts and `sampler/adversarial_fraction`."""
        return {**{f"sampler/{name}": count for name, count in self.epoch_counts.items()},
                "sampler/adversarial_fraction": self.adversarial_fraction}

    # adaptive mode ------------------------------------------------------------------------------

    def update(self, errors: dict[str, float]) -> None:
        """Per-variant error rates or losses for adaptive mode; they take effect at the next epoch.

        Under an initialised torch.distributed every rank must call this (it is a collective): each
        variant's value becomes its mean over the ranks that reported it, so policies stay identical.
        """
        self.policy.update(average_over_ranks(errors, self.policy.names))

    # resumption ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-serialisable: epoch, batches the consumer received, policy state, this epoch's counts, layout."""
        return {"epoch": self.epoch, "batches_consumed": self._consumed, "adapted_epoch": self._adapted_epoch,
                "policy": self.policy.state_dict(), "counts": self._counts.tolist(), "layout": self.layout()}

    def load_state_dict(self, state: dict) -> None:
        """Resume after the saved batch: the rest is what an uninterrupted run would yield."""
        saved = state.get("layout", {})
        mismatched = {k: (v, saved.get(k)) for k, v in self.layout().items() if saved.get(k) != v}
        if mismatched:
            described = ", ".join(f"{k} is {now!r}, saved {then!r}" for k, (now, then) in mismatched.items())
            raise SamplerError(f"saved sampler state does not fit this loader: {described}")
        consumed = int(state["batches_consumed"])
        if not 0 <= consumed <= len(self):
            raise SamplerError(f"saved sampler state is past the end of an epoch ({consumed} of {len(self)} batches)")
        self.epoch, self._consumed = int(state["epoch"]), consumed
        self._adapted_epoch = state["adapted_epoch"]
        self.policy.load_state_dict(state["policy"])
        self._counts[:] = state.get("counts", 0)


def average_over_ranks(errors: dict[str, float], names: list[str]) -> dict[str, float]:
    """Each name's mean over the ranks that report it; unchanged outside torch.distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return errors
    unknown = set(errors) - set(names) - {"clean"}
    if unknown:  # fail on every rank alike, before the collective
        raise SamplerError(f"update() got variants the policy does not draw: {', '.join(sorted(unknown))}")
    keys = ["clean", *names]
    device = f"cuda:{torch.cuda.current_device()}" if torch.distributed.get_backend() == "nccl" else "cpu"
    sums = torch.tensor([[float(errors.get(k, 0.0)), float(k in errors)] for k in keys], dtype=torch.float64,
                        device=device)
    torch.distributed.all_reduce(sums)
    return {key: float(total / count) for key, (total, count) in zip(keys, sums.tolist(), strict=True) if count}
