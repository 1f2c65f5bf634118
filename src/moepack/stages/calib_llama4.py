"""Calibration inside Llama 4's MoE block, whose router scales each expert's *input* (not its output).

transformers' Llama4TextMoe runs every expert densely on the input times the sigmoid score (zero for the experts a
token did not choose) and adds the shared expert. The instrumented forward below computes the same sum over the
chosen experts only, and records what calibration records for every family: routed token slots, the routing weight
(the sigmoid score of the chosen logit), REAP saliency (‖expert output‖: the score is already inside it), and the
importance matrix of each expert's inputs as llama.cpp sees them (input × score for gate/up: llama.cpp's
build_moe_ffn scales before the matmul for llama4).
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moepack.stages.calib_hooks import Accumulator

__all__ = ["instrument_scaled_input_moe"]


def instrument_scaled_input_moe(moe: torch.nn.Module, layer: int, acc: Accumulator, names: dict[str, str]) -> None:
    """Replace Llama4TextMoe.forward with an eager per-expert loop that records statistics; `names` maps "gate",
    "up", "down" to the imatrix keys."""
    n_exp = int(moe.num_experts)
    r = acc.router.setdefault(layer, {k: torch.zeros(n_exp, dtype=torch.float64)
                                      for k in ("counts", "weight_sum", "saliency_sum")})
    module = weakref.ref(moe)  # no module → forward → module cycle

    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moe = module()
        x = hidden_states.reshape(-1, moe.hidden_dim)  # (T, H)
        scores, logits = moe.router(x)  # (T, E): sigmoid of the chosen logits, 0 elsewhere
        idx = torch.topk(logits, moe.top_k, dim=1).indices  # (T, k): the router's own choice
        r["counts"] += torch.bincount(idx.reshape(-1), minlength=n_exp).double()
        out = moe.shared_expert(x)  # (T, H)
        experts = moe.experts
        for e in torch.unique(idx).tolist():
            tok = torch.where(idx == e)[0]  # routed tokens (each chooses e once)
            w = scores[tok, e]  # (n_e,)
            r["weight_sum"][e] += w.double().sum()
            xin = x[tok] * w[:, None]  # (n_e, H): the score scales the expert's input
            acc.add(names["gate"], xin, e, n_exp)
            acc.add(names["up"], xin, e, n_exp)
            gate, up = (xin @ experts.gate_up_proj[e]).chunk(2, dim=-1)  # (n_e, I) each
            a = up * experts.act_fn(gate)  # (n_e, I)
            acc.add(names["down"], a, e, n_exp)
            y = a @ experts.down_proj[e]  # (n_e, H)
            r["saliency_sum"][e] += y.double().norm(dim=-1).sum()
            out.index_add_(0, tok, y.to(out.dtype))
        return out, logits

    moe.forward = forward
