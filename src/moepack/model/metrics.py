"""The one home of the output metrics every stage compares models by: log-probabilities, KL(reference ‖ model),
negative log-likelihood, top-1 agreement and perplexity.

Each function takes torch tensors (the layer-by-layer forward: float32, as the model computes) or numpy arrays
(llama.cpp's logits in `moepack eval`: float64), and computes the same formula on either in that array's own
precision. KL(p ‖ q) = Σ p (log p − log q) is summed term by term (a one-pass Σ p log p − Σ p z + logsumexp(z) form
loses ~1e-5 relative to float32 cancellation); a mean over many tokens adds per-batch float64 sums (`KLDMean`),
so it does not depend on how the tokens are batched beyond the float64 rounding.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["log_probs", "token_kld", "nll", "top1", "top1_agree", "ppl", "KLDMean", "kld_summary"]

log = logging.getLogger(__name__)


def _torch(x: Any) -> bool:
    return not isinstance(x, np.ndarray) and hasattr(x, "exp")


def log_probs(logits: Any) -> Any:
    """Log-softmax over the vocabulary (last axis): torch in float32, numpy in float64. (..., V) → (..., V)."""
    if _torch(logits):
        import torch

        return torch.log_softmax(logits.float(), dim=-1)
    x = np.asarray(logits, dtype=np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_kld(lp_ref: Any, lp: Any) -> Any:
    """KL(reference ‖ model) per token, in nats, from log-probabilities: (..., V) → (...)."""
    p = lp_ref.exp() if _torch(lp_ref) else np.exp(lp_ref)
    return (p * (lp_ref - lp)).sum(-1)


def nll(lp: Any, targets: Any) -> Any:
    """Negative log-likelihood of `targets` (...,) under log-probabilities (..., V) → (...)."""
    if _torch(lp):
        return -lp.gather(-1, targets[..., None])[..., 0]
    return -np.take_along_axis(lp, np.asarray(targets)[..., None], axis=-1)[..., 0]


def top1(logits: Any) -> Any:
    """The most likely token per position: (..., V) → (...)."""
    return logits.argmax(-1)


def top1_agree(ref_logits: Any, logits: Any) -> Any:
    """Whether the model's most likely token is the reference's, per position: (..., V) → (...) bool."""
    return top1(ref_logits) == top1(logits)


def ppl(nlls: Any) -> float:
    """Perplexity: exp of the mean negative log-likelihood, in the array's own precision."""
    m = nlls.mean()
    return float(m.exp() if _torch(m) else np.exp(m))


@dataclass
class KLDMean:
    """Mean KLD over batches of tokens: each batch's per-token KLD summed in float64, the sums added in order."""

    total: float = 0.0
    n_tokens: int = 0

    def add(self, kld: Any) -> None:
        """Per-token KLD of one batch (any shape)."""
        self.total += float(kld.double().sum() if _torch(kld) else np.asarray(kld, dtype=np.float64).sum())
        self.n_tokens += int(kld.numel() if _torch(kld) else np.size(kld))

    @property
    def mean(self) -> float:
        return self.total / self.n_tokens


def kld_summary(kld: np.ndarray, blocks: int | None = None) -> dict[str, float]:
    """Mean, median, 99th and 99.9th percentile and maximum of per-token KLDs (N,); with `blocks` (the number of
    equal windows the tokens come in, in order), the 95 % confidence interval of the mean from the spread of the
    window means: tokens of one window are correlated, so a token-level standard error would be too narrow."""
    out = {"kld_mean": float(kld.mean()), "kld_median": float(np.median(kld)),
           "kld_p99": float(np.percentile(kld, 99)), "kld_p999": float(np.percentile(kld, 99.9)),
           "kld_max": float(kld.max())}
    if blocks is not None and blocks >= 2:
        means = kld.reshape(blocks, -1).mean(axis=1)  # (B,)
        half = 1.96 * float(means.std(ddof=1)) / np.sqrt(blocks)
        out.update(kld_ci95_low=out["kld_mean"] - half, kld_ci95_high=out["kld_mean"] + half)
    return out
