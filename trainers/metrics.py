"""What the loop measures per epoch, and where it goes: JSON lines, TensorBoard when installed, the log.

`metrics.jsonl` holds one JSON object per epoch (loss, accuracy, per-variant training accuracy,
the sampler's realised counts and adversarial fraction, time, images/s, evaluation accuracy).
With the `tensorboard` extra installed the same scalars go to event files beside it.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from advpipe.trainers import distributed

log = logging.getLogger(__name__)


@dataclass
class EpochSums:
    """Sample-weighted sums of an epoch's metrics, and per-variant correct counts."""

    values: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    correct: dict[int, list[int]] = field(default_factory=dict)  # variant id -> [correct, seen]
    seen: int = 0

    def add(self, count: int, loss: float, metrics: dict[str, Any], variant: Tensor) -> None:
        self.seen += count
        self.values["loss"] += loss * count
        for key, value in metrics.items():
            if key == "correct":
                self._add_correct(value, variant)
            else:
                self.values[f"train_{key}"] += float(value) * count

    def _add_correct(self, correct: Tensor, variant: Tensor) -> None:
        correct, variant = correct.detach().bool().cpu(), variant.cpu()
        for vid in variant.unique().tolist():
            mask = variant == vid
            tally = self.correct.setdefault(int(vid), [0, 0])
            tally[0] += int(correct[mask].sum())
            tally[1] += int(mask.sum())

    def to_state(self) -> dict:
        return {"values": dict(self.values), "correct": {str(k): v for k, v in self.correct.items()},
                "seen": self.seen}

    @classmethod
    def from_state(cls, state: dict) -> EpochSums:
        sums = cls()
        sums.values.update(state["values"])
        sums.correct = {int(k): list(v) for k, v in state["correct"].items()}
        sums.seen = int(state["seen"])
        return sums

    def reduced(self) -> EpochSums:
        """The sums over every rank (collective under torch.distributed)."""
        if not distributed.active():
            return self
        keys = sorted(self.values)
        variants = sorted(set(distributed.gather_objects(sorted(self.correct))))
        flat = [self.values[k] for k in keys] + [float(self.seen)]
        flat += [float(x) for vid in variants for x in self.correct.get(vid, [0, 0])]
        totals = distributed.sum_floats(flat)
        out = EpochSums()
        out.values.update(dict(zip(keys, totals[: len(keys)], strict=True)))
        out.seen = int(totals[len(keys)])
        rest = totals[len(keys) + 1:]
        out.correct = {vid: [int(rest[2 * i]), int(rest[2 * i + 1])] for i, vid in enumerate(variants)}
        return out

    def record(self, variant_names: list[str]) -> dict[str, float]:
        out = {key: value / self.seen for key, value in self.values.items()}
        for vid, (correct, seen) in sorted(self.correct.items()):
            name = variant_names[vid] if vid < len(variant_names) else str(vid)
            out[f"train_acc/{name}"] = correct / seen if seen else 0.0
        return out



class MetricsWriter:
    """Appends epoch records to `metrics.jsonl` (and TensorBoard event files when available); rank 0 only."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._board = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the optional `tensorboard` extra is not installed
                log.debug("tensorboard is not installed; metrics go to %s only", self.path)
            else:
                self._board = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def __call__(self, record: dict[str, Any]) -> None:
        """Write epoch N's record as line N (a resumed run replaces lines written after its checkpoint)."""
        self.truncate(record["epoch"] - 1)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self._board is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "epoch":
                    self._board.add_scalar(key, value, record["epoch"])
            self._board.flush()

    def truncate(self, epochs: int) -> None:
        """Keep the first `epochs` records: a resumed run rewrites what came after its checkpoint."""
        if self.path.is_file():
            lines = self.path.read_text().splitlines(keepends=True)[:epochs]
            self.path.write_text("".join(lines))

    def close(self) -> None:
        if self._board is not None:
            self._board.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
