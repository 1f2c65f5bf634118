"""Choosing for every domain, not for the average: a plan tuned to the mean of the selection text can lose to
llama.cpp's fixed mixture on one of its domains, and a file is served on text its calibration did not hold.

Each selection sequence keeps the domain of the calibration text it came from (moepack.stages.calibrate). A plan's
per-token KLDs on them give, per domain, its mean and a confidence interval from windows of a sequence (the tokens
of one window are correlated; windows are the unit, as in moepack.model.metrics.mean_ci95). Two plans measured on
the same tokens are compared pair-wise, window by window: plan A is *worse* than B on a domain when the 95 % CI of
their mean difference lies above zero and A's mean lies above B's own 95 % CI (`DomainKLD.worse_than`). compress
keeps only plans no worse than the best fitting llama.cpp mixture on any domain — per domain the best of the
fitting mixtures (`envelope`) — then takes the lowest mean among them.
With one domain this is the lowest mean, as before domains existed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["DomainKLD", "WINDOWS", "envelope", "robust_choice"]

log = logging.getLogger(__name__)

WINDOWS = 4  # windows per selection sequence: the CIs' unit
Z95 = 1.96


@dataclass(frozen=True)
class DomainKLD:
    """One plan's per-token KLD on the selection tokens with each sequence's domain."""

    names: tuple[str, ...]
    labels: np.ndarray  # (N,) each sequence's domain: an index into names
    tokens: np.ndarray  # (N, L) per-token KLD, nats

    def _windows(self, d: int) -> np.ndarray:
        """Domain `d`'s window means (n·W,)."""
        rows = self.tokens[self.labels == d]  # (n, L)
        w = WINDOWS if rows.shape[1] >= WINDOWS else 1
        cut = rows.shape[1] - rows.shape[1] % w
        return rows[:, :cut].reshape(len(rows) * w, cut // w).mean(axis=1)  # (n·W,)

    def means(self) -> dict[str, tuple[float, float]]:
        """Per domain: (mean KLD, half-width of its 95 % CI; 0 with one window)."""
        out = {}
        for d, name in enumerate(self.names):
            win = self._windows(d)
            half = Z95 * float(win.std(ddof=1)) / np.sqrt(len(win)) if len(win) > 1 else 0.0
            out[name] = (float(win.mean()), half)
        return out

    def worse_than(self, other: DomainKLD) -> list[str]:
        """The domains on which this plan is worse than `other` (measured on the same tokens): the 95 % CI of the
        paired window differences lies above zero, and the plan's mean lies above `other`'s 95 % CI. The pairing
        alone finds differences of a few per cent that no evaluation would call worse (there, worse is CIs apart);
        the second condition asks for a loss as large as `other`'s own uncertainty."""
        worse = []
        theirs = other.means()
        for d, name in enumerate(self.names):
            gap, half = self.paired(other, d)
            if gap - half > 0 and gap > theirs[name][1]:  # the plan's mean is other's mean + gap
                worse.append(name)
        return worse

    def paired(self, other: DomainKLD, d: int = 0) -> tuple[float, float]:
        """(mean, 95 % CI half-width) of this plan's window KLDs minus `other`'s on domain `d` (the same tokens)."""
        diff = self._windows(d) - other._windows(d)  # (n·W,)
        half = Z95 * float(diff.std(ddof=1)) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
        return float(diff.mean()), half

    def record(self) -> dict[str, list[float]]:
        """{domain: [mean, CI half-width]} for summary.json."""
        return {k: [m, h] for k, (m, h) in self.means().items()}


def envelope(measured: Sequence[tuple[str, DomainKLD]]) -> tuple[DomainKLD, dict[str, str]]:
    """The best of several plans on each domain (the llama.cpp mixtures that fit: on one domain the largest may
    measure best, on another a different one): per domain, the sequences of the plan with the lowest mean there,
    and which plan that was."""
    first = measured[0][1]
    tokens, which = first.tokens.copy(), {}
    for d, name in enumerate(first.names):
        rows = first.labels == d
        i = min(range(len(measured)), key=lambda j: float(measured[j][1].tokens[rows].mean()))
        tokens[rows], which[name] = measured[i][1].tokens[rows], measured[i][0]
    return DomainKLD(first.names, first.labels, tokens), which


def robust_choice(options: Sequence[tuple[str, float, DomainKLD | None]],
                  baseline: DomainKLD | None) -> tuple[int, dict[int, list[str]]]:
    """Index of the option (its name, mean KLD, per-domain KLDs) with the lowest mean among those no worse than
    `baseline` on any domain (all of them when there is no baseline, or none qualifies), and per option index the
    domains it is worse on."""
    worse = {i: (dom.worse_than(baseline) if baseline is not None and dom is not None else [])
             for i, (_, _, dom) in enumerate(options)}
    fine = [i for i in range(len(options)) if not worse[i]]
    # none nowhere worse (the baseline mixes several plans): the fewest domains lost, then the lowest mean
    best = min(fine, key=lambda i: options[i][1]) if fine else min(
        range(len(options)), key=lambda i: (len(worse[i]), options[i][1]))
    for i, names in worse.items():
        if names:
            log.info("%s: worse than the best llama.cpp mixture on %s (selection tokens); not chosen",
                     options[i][0], ", ".join(names))
    return best, worse
