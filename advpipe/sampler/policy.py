"""The dynamic-probability variant policy (METHODS.md section 2).

For each drawn image: with probability r return an adversarial variant, else
clean; the variant k is chosen with probability w_k / sum(w). r and every w_k
are redrawn uniformly inside their configured ranges [lo, hi] at every
resampling point (each epoch, batch or sample). A fixed policy is lo = hi.

Every draw is a pure function of (seed, epoch, position): the generator for a
resampling point is seeded with those numbers, never with global state, so any
process can recompute any draw.

Adaptive mode (beyond the paper): `update(errors)` records per-variant error
rates; at the next epoch each range's centre moves toward the variants the
model gets wrong, never outside [lo_k, hi_k] (see `Policy.adapt`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from advpipe.config import Range, SamplerConfig
from advpipe.errors import SamplerError

log = logging.getLogger(__name__)

POINT_CODES = {"epoch": 1, "batch": 2, "sample": 3}
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
COIN, PICK = 1000, 1001  # stream tags of the per-image random numbers


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of uint64 (wrapping arithmetic is intended)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(*keys: int | np.ndarray) -> np.ndarray:
    """Uniform [0, 1) numbers that are a pure function of their integer keys (broadcast together).

    A counter-based generator: any process computes the same number for the same
    (seed, epoch, point, stream), with no state to carry and no per-draw setup cost.
    """
    with np.errstate(over="ignore"):
        state = np.full(np.broadcast_shapes(*(np.shape(k) for k in keys)), GOLDEN, dtype=np.uint64)
        for key in keys:
            state = _mix(state ^ (np.asarray(key).astype(np.uint64) + GOLDEN))
    return (state >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass
class Policy:
    """Which adversarial variants may be drawn, with their ranges; ids are the store's (0 = clean)."""

    ratio: Range
    variant_ids: np.ndarray
    names: list[str]
    ranges: list[Range]
    redraw: str = "epoch"
    seed: int = 0
    adaptive: bool = False
    adapt_rate: float = 0.5
    centres: np.ndarray | None = None  # adaptive: where inside each range draws are centred, in [0, 1]
    pending: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.centres is None:
            self.centres = np.full(len(self.ranges), 0.5)
        self._lo = np.array([r.lo for r in self.ranges], dtype=np.float64)
        self._hi = np.array([r.hi for r in self.ranges], dtype=np.float64)

    @classmethod
    def from_config(cls, config: SamplerConfig, store_variants: list[str],
                    scenario: set[str] | frozenset[str] = frozenset()) -> Policy:
        """Resolve groups and names against the store's variants; every problem is a SamplerError.

        `scenario` names variants that are distribution shifts rather than attacks (b1, b2):
        they are drawn only when `weights` names them, never by the default mix.
        """
        available = [v for v in store_variants if v != "clean"]
        ranges = resolve_weights(config, available, scenario)
        if config.ratio.hi > 0 and not ranges:
            raise SamplerError("the policy draws adversarial samples (ratio > 0) but no variant has a weight")
        if ranges and config.ratio.hi > 0 and all(r.hi == 0 for r in ranges.values()):
            raise SamplerError("every variant weight is zero: give at least one variant a positive weight range")
        if config.adaptive and all(r.lo == r.hi for r in ranges.values()):
            raise SamplerError("adaptive: true would change nothing: every variant weight is a single value "
                               "(lo == hi), and adaptation only moves draws inside each [lo, hi] range; give "
                               "sampler.weights ranges, or set adaptive: false")
        names = list(ranges)
        return cls(ratio=config.ratio, variant_ids=np.array([store_variants.index(n) for n in names], dtype=np.int64),
                   names=names, ranges=[ranges[n] for n in names], redraw=config.redraw, seed=config.seed,
                   adaptive=config.adaptive, adapt_rate=config.adapt_rate)

    def draw(self, epoch: int, points: np.ndarray | int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(ratio per point, normalised weights per point x variant) at these resampling points."""
        points = np.atleast_1d(np.asarray(points, dtype=np.int64))
        code = POINT_CODES[self.redraw]
        ratio = self.ratio.lo + (self.ratio.hi - self.ratio.lo) * uniforms(self.seed, epoch, code, points, 0)
        if not self.names:
            return ratio, np.zeros((len(points), 0))
        weights = self.raw_weights(epoch, points)
        fallback = (self._hi > 0).astype(np.float64)
        weights = np.where(weights.sum(axis=1, keepdims=True) > 0, weights, fallback)
        return ratio, weights / weights.sum(axis=1, keepdims=True)

    def raw_weights(self, epoch: int, points: np.ndarray | int = 0) -> np.ndarray:
        """Unnormalised weights per point x variant, each inside its [lo_k, hi_k] (adaptive or not)."""
        points = np.atleast_1d(np.asarray(points, dtype=np.int64))
        streams = np.arange(1, len(self.names) + 1)
        u = uniforms(self.seed, epoch, POINT_CODES[self.redraw], points[:, None], streams[None, :])
        low, high = self._window()
        return self._lo + (self._hi - self._lo) * (low + (high - low) * u)

    def _window(self) -> tuple[np.ndarray, np.ndarray]:
        """The part of each range (as fractions of it) that draws come from.

        All of it unless adaptive. Adaptive: a window of width 1 centred on the centre, cut to
        [0, 1]; the centre starts at 0.5 (the whole range, as without adaptation) and a window
        never narrows below half the range, so weights stay random and inside [lo_k, hi_k].
        """
        if not self.adaptive:
            return np.zeros(len(self.names)), np.ones(len(self.names))
        return np.clip(self.centres - 0.5, 0.0, 1.0), np.clip(self.centres + 0.5, 0.0, 1.0)

    def choose(self, epoch: int, positions: np.ndarray, batch: int | np.ndarray = 0,
               failed: np.ndarray | None = None) -> np.ndarray:
        """Variant id (0 = clean) for the images drawn at these epoch positions.

        `batch` is the resampling point when redraw='batch': one number, or one per position, so
        that a whole epoch is drawn in one call (each draw the same as batch by batch). `failed`
        (len(positions), V+1) bool marks variants whose generation failed for an image; that image's draw is then made
        among its remaining variants, or is clean if none remain.
        """
        positions = np.asarray(positions, dtype=np.int64)
        if not self.names or not len(positions):
            return np.zeros(len(positions), dtype=np.int64)
        points = {"epoch": lambda: np.zeros_like(positions), "sample": lambda: positions,
                  "batch": lambda: np.broadcast_to(np.asarray(batch, dtype=np.int64), positions.shape)}[self.redraw]()
        unique, inverse = np.unique(points, return_inverse=True)
        ratio, probabilities = self.draw(epoch, unique)
        ratio, probabilities = ratio[inverse], probabilities[inverse]
        if failed is not None:
            probabilities = probabilities * ~failed[:, self.variant_ids]
        totals = probabilities.sum(axis=1)
        adversarial = (uniforms(self.seed, epoch, COIN, positions) < ratio) & (totals > 0)
        cumulative = np.cumsum(probabilities, axis=1) / np.where(totals > 0, totals, 1)[:, None]
        picks = (cumulative < uniforms(self.seed, epoch, PICK, positions)[:, None]).sum(axis=1)
        picks = np.minimum(picks, len(self.names) - 1)
        return np.where(adversarial, self.variant_ids[picks], 0)

    # adaptive mode -----------------------------------------------------------------------------

    def update(self, errors: dict[str, float]) -> None:
        """Record per-variant error rates (or losses); they take effect at the next `adapt()`."""
        unknown = set(errors) - set(self.names) - {"clean"}
        if unknown:
            raise SamplerError(f"update() got variants the policy does not draw: {', '.join(sorted(unknown))}")
        for name, value in errors.items():
            if not np.isfinite(value) or value < 0:
                raise SamplerError(f"update() needs a finite, non-negative value for '{name}', got {value}")
            self.pending[name] = float(value)

    def adapt(self) -> None:
        """Move each variant's centre toward the top of its range in proportion to its relative error.

        centre_k <- (1 - a) * centre_k + a * e_k / max_j e_j  (a = adapt_rate). Draws come from a
        window around the centre that never leaves [lo_k, hi_k]. Variants without a report keep
        their centre. Applied at epoch starts, so DataLoader prefetching cannot change the sequence.
        """
        reported = {name: value for name, value in self.pending.items() if name in self.names}
        if self.adaptive and reported:  # clean's error is not a weight: it stays out of the normalisation
            top = max(max(reported.values()), 1e-12)
            for index, name in enumerate(self.names):
                if name in reported:
                    target = reported[name] / top
                    self.centres[index] = (1 - self.adapt_rate) * self.centres[index] + self.adapt_rate * target
            self.centres = np.clip(self.centres, 0.0, 1.0)
            log.info("adaptive policy centres: %s", dict(zip(self.names, np.round(self.centres, 3).tolist(),
                                                                strict=True)))
        self.pending.clear()

    def state_dict(self) -> dict:
        return {"centres": np.asarray(self.centres).tolist(), "pending": dict(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.centres = np.array(state["centres"], dtype=np.float64)
        self.pending = dict(state.get("pending", {}))

    def expected_frequencies(self, samples: int = 4096) -> dict[str, float]:
        """Long-run probability of each outcome (clean and each variant) under the policy's redraws."""
        ratio, probabilities = self.draw(0, np.arange(samples))
        result = {"clean": float(1 - ratio.mean()) if self.names else 1.0}
        result.update({n: float((ratio[:, None] * probabilities)[:, i].mean()) for i, n in enumerate(self.names)})
        return result


def resolve_weights(config: SamplerConfig, available: list[str],
                    scenario: set[str] | frozenset[str] = frozenset()) -> dict[str, Range]:
    """Expand groups; a variant named directly overrides its group's range. Unknown names are errors.

    Without `weights`, every adversarial variant gets weight 1 (scenario shifts are left out).
    """
    for group, members in config.groups.items():
        if group in available:
            raise SamplerError(f"group '{group}' has the same name as a store variant; rename the group")
        missing = [m for m in members if m not in available]
        if missing:
            raise SamplerError(f"group '{group}' names variant(s) the store does not have: {', '.join(missing)} "
                               f"(store has: {', '.join(available) or 'none'})")
    if not config.weights:
        return {name: Range(lo=1.0, hi=1.0) for name in available if name not in scenario}
    ranges: dict[str, Range] = {}
    for key, value in config.weights.items():
        if key in config.groups:
            for member in config.groups[key]:
                ranges.setdefault(member, value)
        elif key not in available:
            raise SamplerError(f"weight for unknown variant or group '{key}' "
                               f"(store has: {', '.join(available) or 'none'}; groups: {', '.join(config.groups)})")
    for key, value in config.weights.items():
        if key not in config.groups:
            ranges[key] = value
    return {name: ranges[name] for name in available if name in ranges}


def scenario_variants(manifest) -> frozenset[str]:
    """A store's variants of kind 'shift' (the calibrater's b1/b2), as the manifest records them.

    Stores of format version 2 predate kinds; reading their manifest fills the kind in from the
    generator name (advpipe.stores.manifest.SHIFT_GENERATORS), so they keep working.
    """
    return frozenset(manifest.variants_of_kind("shift"))
