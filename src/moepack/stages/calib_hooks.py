"""What calibration records inside each decoder layer: forward hooks on every linear map (sums of squared inputs:
llama.cpp's importance matrix), the experts' forward replaced by an instrumented eager loop (routing counts, weights
and REAP saliency), and DeepSeek MLA's attn_k_b / attn_v_b inputs, which exist only inside attention.

`preparer(view, acc)` is the `prepare(i, layer)` callback of `LayerRunner.run`; everything lands in an
`Accumulator` of float64 sums. With `Accumulator.sim_stride`, every expert of a MoE layer is also applied to a fixed
sample of its tokens (every stride-th), and the Gram matrix of their outputs is summed (expert merging's output
similarity, stages.merge): the same pass, no second forward.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from moepack.errors import MoepackError
from moepack.model.arch import expert_key
from moepack.model.checkpoint import CheckpointView
from moepack.model.runner import layer_sources

__all__ = ["HookError", "Accumulator", "preparer", "mla_split", "SIM_TOKENS", "sample_stride"]

log = logging.getLogger(__name__)

SIM_TOKENS = 256  # tokens per MoE layer (per calibration shard) that every expert is applied to for the output Gram


def sample_stride(n_tokens: int) -> int:
    """Every how many tokens one is sampled so that `n_tokens` give about SIM_TOKENS."""
    return max(1, -(-n_tokens // SIM_TOKENS))


class HookError(MoepackError, ValueError):
    """The model's modules are not laid out as calibration expects."""


@dataclass
class Accumulator:
    """float64 accumulators for one run."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # imatrix key → (M, n)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)  # imatrix key → (M,)
    router: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    sim_stride: int = 0  # > 0: sample every sim_stride-th token of each MoE layer for the output Gram; 0: none
    seen: dict[int, int] = field(default_factory=dict)  # tokens each MoE layer has seen so far (for the sample)

    def sample(self, layer: int, n: int) -> torch.Tensor | None:
        """Positions (S,) among the next `n` tokens of `layer` that belong to the fixed sample; None if none."""
        if self.sim_stride <= 0:
            return None
        s = self.seen.get(layer, 0)
        self.seen[layer] = s + n
        idx = torch.arange((-s) % self.sim_stride, n, self.sim_stride)  # (S,)
        return idx if len(idx) else None

    def add_gram(self, layer: int, n_exp: int, x: torch.Tensor,
                 expert_out: Callable[[int, torch.Tensor], torch.Tensor], chunk: int = 16) -> None:
        """Apply every expert to the sampled tokens of x (T, H); add Σ_t y_e(t)·y_f(t) to the layer's out_gram."""
        idx = self.sample(layer, x.shape[0])
        if idx is None:
            return
        r = self.router[layer]
        if "out_gram" not in r:
            r["out_gram"] = torch.zeros(n_exp, n_exp, dtype=torch.float64)
        for c0 in range(0, len(idx), chunk):
            xs = x[idx[c0:c0 + chunk]]  # (S, H)
            ys = torch.stack([expert_out(e, xs) for e in range(n_exp)]).reshape(n_exp, -1).double()  # (E, S·H)
            r["out_gram"] += ys @ ys.T  # (E, E)

    def add(self, key: str, x: torch.Tensor, row: int = 0, n_rows: int = 1) -> None:
        x = x.reshape(-1, x.shape[-1])  # (T, n)
        if key not in self.sums:
            self.sums[key] = torch.zeros(n_rows, x.shape[-1], dtype=torch.float64)
            self.counts[key] = torch.zeros(n_rows, dtype=torch.float64)
        self.sums[key][row] += x.float().pow(2).sum(0).double()
        self.counts[key][row] += x.shape[0]

    def add_heads(self, key: str, x: torch.Tensor, head0: int = 0, n_heads: int | None = None) -> None:
        """Per-head inputs x (T, h, d) of heads head0..head0+h-1 (of n_heads): one row per head."""
        n_heads = n_heads or x.shape[1]
        if key not in self.sums:
            self.sums[key] = torch.zeros(n_heads, x.shape[2], dtype=torch.float64)
            self.counts[key] = torch.zeros(n_heads, dtype=torch.float64)
        self.sums[key][head0:head0 + x.shape[1]] += x.float().pow(2).sum(0).double()
        self.counts[key][head0:head0 + x.shape[1]] += x.shape[0]


def _check_experts_layout(experts: torch.nn.Module) -> None:
    # Bias, transposed and interleaved layouts (gpt-oss) are handled by _expert_linear and the module's own
    # _apply_gate; experts without a gate projection are not.
    if not getattr(experts, "has_gate", True):
        raise HookError(f"{type(experts).__name__}: unsupported expert layout (no gate_up projection)")


def _apply_gate(experts: torch.nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (n, 2I) → (n, I) with the module's own gating (gpt-oss: interleaved, clamped SwiGLU with alpha)."""
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)  # (n, I) each
    return experts.act_fn(gate) * up


def _expert_linear(experts: torch.nn.Module, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
    """One expert's projection `name` ("gate_up_proj" / "down_proj") of x (n, in) → (n, out), as transformers'
    experts compute it: weights (E, out, in), or (E, in, out) when transposed; plus the expert's bias if any."""
    w = getattr(experts, name)[e]
    y = x @ w if getattr(experts, "is_transposed", False) else torch.nn.functional.linear(x, w)
    if getattr(experts, "has_bias", False):
        y = y + getattr(experts, f"{name}_bias")[e]
    return y


def _instrument_experts(experts: torch.nn.Module, layer: int, acc: Accumulator, names: dict[str, str]) -> None:
    """Replace the experts' forward with the eager per-expert loop that also records statistics.

    Computes what transformers' eager experts forward computes, in the same order; `names` maps "gate", "up",
    "down" to the imatrix keys.
    """
    _check_experts_layout(experts)
    n_exp = int(experts.num_experts)
    r = acc.router.setdefault(layer, {k: torch.zeros(n_exp, dtype=torch.float64)
                                      for k in ("counts", "weight_sum", "saliency_sum")})

    module = weakref.ref(experts)  # no module → forward → module cycle: the layer is freed as soon as it is dropped

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        experts = module()
        out = torch.zeros_like(hidden_states)  # (T, H)
        flat = top_k_index.reshape(-1)  # (T*k,)
        r["counts"] += torch.bincount(flat, minlength=n_exp).double()
        r["weight_sum"].index_add_(0, flat, top_k_weights.reshape(-1).double())
        for e in torch.unique(flat).tolist():
            tok, pos = torch.where(top_k_index == e)  # routed tokens and their top-k slot
            x = hidden_states[tok]  # (n_e, H)
            acc.add(names["gate"], x, e, n_exp)
            acc.add(names["up"], x, e, n_exp)
            a = _apply_gate(experts, _expert_linear(experts, x, "gate_up_proj", e))  # (n_e, 2I) → (n_e, I)
            acc.add(names["down"], a, e, n_exp)
            y = _expert_linear(experts, a, "down_proj", e)  # (n_e, H)
            w = top_k_weights[tok, pos]  # (n_e,)
            r["saliency_sum"][e] += (w.double() * y.double().norm(dim=-1)).sum()
            out.index_add_(0, tok, (y * w[:, None]).to(out.dtype))
        acc.add_gram(layer, n_exp, hidden_states, lambda e, x: _expert_linear(
            experts, _apply_gate(experts, _expert_linear(experts, x, "gate_up_proj", e)), "down_proj", e))
        return out

    experts.forward = forward


def _imatrix_keys(view: CheckpointView, layer: int) -> dict[str, str]:
    """"gate", "up", "down" → the imatrix keys of the layer's stacked experts (`...experts.gate_proj.weight`)."""
    gate, up, down = view.spec.expert_projs
    return {role: expert_key(view.expert_ref(layer, 0, kind).name)
            for role, kind in (("gate", gate), ("up", up), ("down", down))}


# Calibration inside Llama 4's MoE block, whose router scales each expert's *input* (not its output).
#
# transformers' Llama4TextMoe runs every expert densely on the input times the sigmoid score (zero for the experts a
# token did not choose) and adds the shared expert. The instrumented forward below computes the same sum over the
# chosen experts only, and records what calibration records for every family: routed token slots, the routing weight
# (the sigmoid score of the chosen logit), REAP saliency (‖expert output‖: the score is already inside it), and the
# importance matrix of each expert's inputs as llama.cpp sees them (input × score for gate/up: llama.cpp's
# build_moe_ffn scales before the matmul for llama4).
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
        acc.add_gram(layer, n_exp, x, lambda e, xs: _scaled_input_expert(experts, e, xs))
        return out, logits

    moe.forward = forward


def _scaled_input_expert(experts: torch.nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """One Llama 4 expert on inputs x (n, H) → (n, H)."""
    gate, up = (x @ experts.gate_up_proj[e]).chunk(2, dim=-1)  # (n, I) each
    return (up * experts.act_fn(gate)) @ experts.down_proj[e]


def preparer(view: CheckpointView, acc: Accumulator) -> Callable[[int, torch.nn.Module], None]:
    """`prepare(i, layer)` for LayerRunner.run: hooks every linear map and instruments the experts."""

    def prepare(i: int, layer: torch.nn.Module) -> None:
        sources = layer_sources(view, i)
        for path, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear) and f"{path}.weight" in sources:
                key = sources[f"{path}.weight"].names[0]
                mod.register_forward_pre_hook(lambda m, args, key=key: acc.add(key, args[0]))
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if experts is not None and "mlp.experts.gate_up_proj" in sources:
            _instrument_experts(experts, i, acc, _imatrix_keys(view, i))
        moe = getattr(layer, "feed_forward", None)  # Llama 4: the router scales the experts' input
        if moe is not None and hasattr(moe, "experts") and "feed_forward.experts.gate_up_proj" in sources:
            instrument_scaled_input_moe(moe, i, acc, _imatrix_keys(view, i))
        if mla_split(view):
            _hook_mla_k_b(view, i, layer, acc)
            _hook_mla_v_b(view, i, layer, acc)

    return prepare


def mla_split(view: CheckpointView) -> bool:
    """Whether llama.cpp runs this model with kv_b_proj split into attn_k_b and attn_v_b (DeepSeek MLA)."""
    return view.spec.kv_cache == "mla" and "kv_lora_rank" in view.config  # deepseek2, glm-dsa


def _hook_mla_v_b(view: CheckpointView, i: int, layer: torch.nn.Module, acc: Accumulator, chunk: int = 16) -> None:
    """Input of llama.cpp's attn_v_b: per head, the attention-weighted sum of the normed latent kv (kv_lora wide).
    Needs the attention probabilities, so DeepSeek layers are calibrated with eager attention."""
    attn = layer.self_attn
    key = f"model.layers.{i}.self_attn.v_b_proj.weight"
    latent: dict[str, torch.Tensor] = {}

    def keep_latent(mod: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        latent["c"] = out.reshape(out.shape[0], 1, -1, out.shape[-1])  # (B, 1, L, kv_lora)

    def collect(mod: torch.nn.Module, args: Any, out: Any) -> None:
        w, c = out[1], latent.pop("c")  # (B, H, L, L), (B, 1, L, kv_lora)
        if w is None:
            raise HookError("DeepSeek calibration needs attention probabilities (eager attention)")
        n_head = w.shape[1]
        for h0 in range(0, n_head, chunk):
            z = torch.matmul(w[:, h0:h0 + chunk].to(c.dtype), c)  # (B, h, L, kv_lora)
            acc.add_heads(key, z.transpose(1, 2).reshape(-1, z.shape[1], z.shape[-1]), h0, n_head)  # (B*L, h, kv)

    attn.kv_a_layernorm.register_forward_hook(keep_latent)
    attn.register_forward_hook(collect)


def _hook_mla_k_b(view: CheckpointView, i: int, layer: torch.nn.Module, acc: Accumulator) -> None:
    """llama.cpp splits DeepSeek's kv_b_proj into attn_k_b (applied to q_nope per head) and attn_v_b; record
    q_nope, the input of attn_k_b, under `...self_attn.k_b_proj.weight` (rows: heads)."""
    cfg = view.config
    n_head, nope = int(cfg["num_attention_heads"]), int(cfg["qk_nope_head_dim"])
    q = getattr(layer.self_attn, "q_b_proj", None) or getattr(layer.self_attn, "q_proj", None)
    if q is None:
        return
    key = f"model.layers.{i}.self_attn.k_b_proj.weight"

    def hook(mod: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        acc.add_heads(key, out.reshape(-1, n_head, out.shape[-1] // n_head)[..., :nope])  # (T, n_head, nope)

    q.register_forward_hook(hook)
