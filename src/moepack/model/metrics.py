"""The one home of the output metrics every stage compares models by: log-probabilities, KL(reference ‖ model),
negative log-likelihood, top-1 agreement and perplexity; and the statistics `moepack eval` reports over scored
tokens (`kld_summary`, `pair_summary`), each mean with a 95 % confidence interval from the spread of window means.

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

__all__ = ["log_probs", "token_kld", "nll", "top1", "top1_agree", "ppl", "KLDMean", "mean_ci95",
           "kld_summary", "pair_summary"]

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


def mean_ci95(x: np.ndarray, blocks: int | None) -> tuple[float, float] | None:
    """The 95 % confidence interval of the mean of `x` (N,) from the spread of its `blocks` equal windows' means (the
    tokens come in windows, in order); None without two windows. Tokens of one window are correlated, so a
    token-level standard error would be too narrow."""
    if blocks is None or blocks < 2:
        return None
    means = np.asarray(x, dtype=np.float64).reshape(blocks, -1).mean(axis=1)  # (B,)
    m, half = float(means.mean()), 1.96 * float(means.std(ddof=1)) / np.sqrt(blocks)
    return float(m - half), float(m + half)


def _with_ci(out: dict[str, float], key: str, x: np.ndarray, blocks: int | None, ci_name: str = "") -> None:
    """out[key] = mean of x, and out[NAME_ci95_low/high] (NAME: ci_name or key) when there are windows."""
    out[key] = float(np.mean(x))
    ci = mean_ci95(x, blocks)
    if ci is not None:
        out[f"{ci_name or key}_ci95_low"], out[f"{ci_name or key}_ci95_high"] = ci


def kld_summary(kld: np.ndarray, blocks: int | None = None) -> dict[str, float]:
    """Mean, median, 99th and 99.9th percentile and maximum of per-token KLDs (N,); with `blocks` (the number of
    equal windows the tokens come in, in order), the 95 % confidence interval of the mean (`mean_ci95`)."""
    out: dict[str, float] = {}
    _with_ci(out, "kld_mean", kld, blocks, ci_name="kld")
    out.update(kld_median=float(np.median(kld)), kld_p99=float(np.percentile(kld, 99)),
               kld_p999=float(np.percentile(kld, 99.9)), kld_max=float(kld.max()))
    return out


def pair_summary(nll_ref: np.ndarray, nll_model: np.ndarray, same_top: np.ndarray,
                 blocks: int | None = None) -> dict[str, float]:
    """A model against the reference on the same scored tokens (N,), as llama-perplexity's KL-divergence run reports:

    - `dp_mean`, `dp_rms`: mean and root mean square of Δp = p_model(target) − p_ref(target);
    - `top1`: share of tokens where the model's most likely token is the reference's (`same_top`, bool);
    - `ln_ppl_ratio` = mean(nll_model − nll_ref), and `ppl_ratio` = its exp = model PPL / reference PPL.

    With `blocks` windows, each gets a 95 % interval (`*_ci95_low/high`) from window means: of mean(Δp²) for the RMS,
    whose square root keeps the interval (clipped at 0), of the log ratio for the ratio (exp keeps it), and of the
    share (clipped to [0, 1])."""
    nll_ref, nll_model = np.asarray(nll_ref, dtype=np.float64), np.asarray(nll_model, dtype=np.float64)
    dp = np.exp(-nll_model) - np.exp(-nll_ref)  # (N,)
    out: dict[str, float] = {}
    _with_ci(out, "dp_mean", dp, blocks)
    sq: dict[str, float] = {}
    _with_ci(sq, "dp_rms", dp * dp, blocks)
    out.update({k: float(np.sqrt(max(v, 0.0))) for k, v in sq.items()})
    _with_ci(out, "top1", np.asarray(same_top, dtype=np.float64), blocks)
    for k in ("top1_ci95_low", "top1_ci95_high"):
        if k in out:
            out[k] = min(max(out[k], 0.0), 1.0)
    _with_ci(out, "ln_ppl_ratio", nll_model - nll_ref, blocks)
    for k in [k for k in out if k.startswith("ln_ppl_ratio")]:
        out[k[3:]] = float(np.exp(out[k]))  # ppl_ratio, ppl_ratio_ci95_low/high
    return out
