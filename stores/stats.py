"""Per-variant statistics, accumulated shard by shard and merged into the manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from advpipe.stores.manifest import VariantStats


@dataclass
class Tally:
    """Sums over one shard (or more, after `merge`) for one variant.

    Perturbation norms are over the images whose generator succeeded, measured on
    what the store returns (after encoding), so they describe the stored data.
    """

    count: int = 0
    failed: int = 0
    clean_correct: int = 0
    fooled: int = 0
    sum_l2: float = 0.0
    max_l2: float = 0.0
    sum_linf: float = 0.0
    max_linf: float = 0.0
    max_abs_error: float = 0.0
    scored: bool = False

    @classmethod
    def measure(cls, clean: np.ndarray, decoded: np.ndarray, failed: np.ndarray, max_abs_error: float,
                clean_pred: np.ndarray | None = None, variant_pred: np.ndarray | None = None,
                labels: np.ndarray | None = None) -> Tally:
        """Tally one batch; predictions (from the source model) are optional."""
        ok = ~failed
        delta = (decoded - clean).reshape(len(decoded), -1)[ok]
        l2 = np.linalg.norm(delta, axis=1) if len(delta) else np.zeros(0)
        linf = np.abs(delta).max(axis=1) if len(delta) and delta.shape[1] else np.zeros(0)
        tally = cls(count=len(decoded), failed=int(failed.sum()), sum_l2=float(l2.sum()),
                    max_l2=float(l2.max(initial=0.0)), sum_linf=float(linf.sum()),
                    max_linf=float(linf.max(initial=0.0)), max_abs_error=float(max_abs_error))
        if clean_pred is not None and variant_pred is not None and labels is not None:
            correct = (clean_pred == labels) & ok
            tally.clean_correct = int(correct.sum())
            tally.fooled = int((correct & (variant_pred != labels)).sum())
            tally.scored = True
        return tally

    def merge(self, other: Tally) -> Tally:
        return Tally(
            count=self.count + other.count, failed=self.failed + other.failed,
            clean_correct=self.clean_correct + other.clean_correct, fooled=self.fooled + other.fooled,
            sum_l2=self.sum_l2 + other.sum_l2, max_l2=max(self.max_l2, other.max_l2),
            sum_linf=self.sum_linf + other.sum_linf, max_linf=max(self.max_linf, other.max_linf),
            max_abs_error=max(self.max_abs_error, other.max_abs_error),
            scored=self.scored or other.scored,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> VariantStats:
        done = self.count - self.failed
        return VariantStats(
            count=self.count, failed=self.failed, clean_correct=self.clean_correct, fooled=self.fooled,
            success_rate=(self.fooled / self.clean_correct) if self.scored and self.clean_correct else None,
            mean_l2=self.sum_l2 / done if done else None, max_l2=self.max_l2 if done else None,
            mean_linf=self.sum_linf / done if done else None, max_linf=self.max_linf if done else None,
            max_abs_error=self.max_abs_error,
        )


def merge_all(tallies: list[Tally]) -> Tally:
    total = Tally()
    for tally in tallies:
        total = total.merge(tally)
    return total
