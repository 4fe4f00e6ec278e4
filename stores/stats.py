"""Per-variant statistics, accumulated shard by shard and merged into the manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from advpipe.stores.manifest import VariantStats


@dataclass
class Tally:
    """Sums over one shard (or more, after `merge`) for one variant.

    Perturbation norms are over the images whose generator succeeded, measured on
    what the store returns (after encoding), so they describe the stored data. Success
    is counted twice: on what a reader gets back (`fooled`) and on the generator's own
    output (`fooled_fresh`); `lost` are the images the storage round trip turned from
    fooling the model into not fooling it (a float16 delta can move a boundary-minimal
    attack back across the boundary). `seconds` is generator time (summed over workers).
    `fallbacks` counts images that got their generator's documented fallback (`style`: no
    image of another class in the split), set by the worker from `Generator.fallbacks`.
    """

    count: int = 0
    failed: int = 0
    clean_correct: int = 0
    fooled: int = 0
    fooled_fresh: int = 0
    lost: int = 0
    sum_l2: float = 0.0
    max_l2: float = 0.0
    sum_linf: float = 0.0
    max_linf: float = 0.0
    max_abs_error: float = 0.0
    seconds: float = 0.0
    fallbacks: int = 0
    scored: bool = False
    timed: bool = False

    @classmethod
    def measure(cls, clean: np.ndarray, decoded: np.ndarray, failed: np.ndarray, max_abs_error: float,
                clean_pred: np.ndarray | None = None, variant_pred: np.ndarray | None = None,
                labels: np.ndarray | None = None, fresh_pred: np.ndarray | None = None) -> Tally:
        """Tally one batch; predictions (from the source model) are optional.

        `variant_pred` are the model's predictions on the decoded (stored) images,
        `fresh_pred` on the generator's output before storage (default: the same).
        """
        ok = ~failed
        delta = (decoded - clean).reshape(len(decoded), -1)[ok]
        l2 = np.linalg.norm(delta, axis=1) if len(delta) else np.zeros(0)
        linf = np.abs(delta).max(axis=1) if len(delta) and delta.shape[1] else np.zeros(0)
        tally = cls(count=len(decoded), failed=int(failed.sum()), sum_l2=float(l2.sum()),
                    max_l2=float(l2.max(initial=0.0)), sum_linf=float(linf.sum()),
                    max_linf=float(linf.max(initial=0.0)), max_abs_error=float(max_abs_error))
        if clean_pred is not None and variant_pred is not None and labels is not None:
            fresh_pred = variant_pred if fresh_pred is None else fresh_pred
            correct = (clean_pred == labels) & ok
            fooled, fooled_fresh = correct & (variant_pred != labels), correct & (fresh_pred != labels)
            tally.clean_correct = int(correct.sum())
            tally.fooled = int(fooled.sum())
            tally.fooled_fresh = int(fooled_fresh.sum())
            tally.lost = int((fooled_fresh & ~fooled).sum())
            tally.scored = True
        return tally

    @classmethod
    def from_dict(cls, values: dict) -> Tally:
        """A tally saved by `to_dict` (keys this version does not know are ignored, missing ones default)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def merge(self, other: Tally) -> Tally:
        return Tally(
            count=self.count + other.count, failed=self.failed + other.failed,
            clean_correct=self.clean_correct + other.clean_correct, fooled=self.fooled + other.fooled,
            fooled_fresh=self.fooled_fresh + other.fooled_fresh, lost=self.lost + other.lost,
            sum_l2=self.sum_l2 + other.sum_l2, max_l2=max(self.max_l2, other.max_l2),
            sum_linf=self.sum_linf + other.sum_linf, max_linf=max(self.max_linf, other.max_linf),
            max_abs_error=max(self.max_abs_error, other.max_abs_error), seconds=self.seconds + other.seconds,
            fallbacks=self.fallbacks + other.fallbacks,
            scored=self.scored or other.scored, timed=self.timed or other.timed,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> VariantStats:
        done = self.count - self.failed
        rate = self.scored and self.clean_correct > 0
        return VariantStats(
            count=self.count, failed=self.failed, clean_correct=self.clean_correct, fooled=self.fooled,
            success_rate=self.fooled / self.clean_correct if rate else None,
            fooled_fresh=self.fooled_fresh, success_rate_fresh=self.fooled_fresh / self.clean_correct if rate else None,
            lost=self.lost,
            mean_l2=self.sum_l2 / done if done else None, max_l2=self.max_l2 if done else None,
            mean_linf=self.sum_linf / done if done else None, max_linf=self.max_linf if done else None,
            max_abs_error=self.max_abs_error, fallbacks=self.fallbacks,
            seconds=self.seconds if self.timed else None,
            images_per_second=self.count / self.seconds if self.timed and self.seconds > 0 else None,
        )


def merge_all(tallies: list[Tally]) -> Tally:
    total = Tally()
    for tally in tallies:
        total = total.merge(tally)
    return total
