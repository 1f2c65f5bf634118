"""llama.cpp's standard mixtures (llama-quantize's Q2_K, Q3_K_M, Q4_K_M, IQ2_XXS, ...) as data: the GGML type each
tensor of a model gets under a mixture, hence its size, before anything is quantized (`moepack inspect` plans with
it; `moepack quantize --ftype` writes the file with llama.cpp itself).

The tables follow llama.cpp's src/llama-quant.cpp (`llama_ftype_get_default_type`, `llama_tensor_get_type_impl`)
for the tensors the supported MoE architectures have, with an importance matrix given (the IQ mixtures need one and
moepack always has one): each mixture has a base type, and per tensor category the first rule whose condition
holds replaces it. Conditions see the tensor's layer, its index among the tensors of its category in file order
(the order llama.cpp walks them in), the expert count and the GQA ratio. A type whose blocks do not divide the row
falls back as llama.cpp's `tensor_type_fallback` does (`moepack.gguf.types.written_bytes`). Left out: Falcon's and
70B-dense rules, tensors no MoE architecture here has. tests/test_config_only.py checks the tables against the
types llama_model_quantize writes.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple, Sequence

import gguf

from moepack.errors import MoepackError
from moepack.gguf.names import gguf_outputs
from moepack.gguf.tensors import OutTensor
from moepack.gguf.types import fallback_type, written_bytes
from moepack.model.arch import Role
from moepack.model.checkpoint import CheckpointView, config_get
from moepack.model.pruned import kept_count

__all__ = ["MIXTURES", "BASE", "RULES", "mixture_types", "mixture_sizes", "MixtureSize", "category"]

log = logging.getLogger(__name__)

T = gguf.GGMLQuantizationType

# llama_ftype_get_default_type: the type of every quantized tensor no rule changes.
BASE: dict[str, str] = {
    "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
    "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q8_0": "Q8_0", "IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M",
    "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_XS", "IQ2_M": "IQ2_S", "IQ3_XXS": "IQ3_XXS",
    "IQ3_XS": "IQ3_S", "IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S", "IQ4_XS": "IQ4_XS", "IQ4_NL": "IQ4_NL",
}
MIXTURES = tuple(BASE)

Rule = tuple[str, str, str]  # (category, condition, type): the first rule of a category whose condition holds

_IQ_LOW = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M")  # llama.cpp's branch for the lowest IQ mixtures
# output.weight (and a tied token_embd): Q8_0 on rows the base type's blocks do not divide, else Q5_K for the low
# IQ mixtures and IQ3_XXS, else Q6_K.
_OUTPUT_LOW: tuple[Rule, ...] = (("output", "ragged", "Q8_0"), ("output", "", "Q5_K"))
_OUTPUT: tuple[Rule, ...] = (("output", "ragged", "Q8_0"), ("output", "", "Q6_K"))
# Mixtral-style 8-expert models: attn_v and attn_k at Q8_0 in every mixture outside the low IQ branch.
_EIGHT: tuple[Rule, ...] = (("attn_v", "experts==8", "Q8_0"), ("attn_k", "experts==8", "Q8_0"))
_OUT8 = ("attn_output", "experts==8", "Q5_K")


def _low_iq(ftype: str, hi: str) -> tuple[Rule, ...]:
    """The IQ1/IQ2 mixtures; `hi` is IQ3_S for IQ2_S/IQ2_M, else Q2_K."""
    embd = "IQ3_S" if ftype in ("IQ2_S", "IQ2_M") else "Q2_K"
    out = "IQ2_XXS" if ftype in ("IQ1_S", "IQ1_M") else "IQ3_S" if ftype in ("IQ2_S", "IQ2_M") else None
    return (_OUTPUT_LOW + (("token_embd", "", embd), ("attn_v", "gqa>=4|experts>=4", "Q4_K"), ("attn_v", "", hi),
                           ("attn_k", "experts==8", "Q4_K"), ("ffn_down", "down<n/8", hi), _OUT8)
            + ((("attn_output", "", out),) if out else ()))


RULES: dict[str, tuple[Rule, ...]] = {
    **{f: _low_iq(f, "IQ3_S" if f in ("IQ2_S", "IQ2_M") else "Q2_K") for f in _IQ_LOW},
    "Q2_K": _EIGHT + _OUTPUT + (("attn_v", "gqa>=4", "Q4_K"), ("attn_v", "", "Q3_K"), ("ffn_down", "", "Q3_K"),
                                _OUT8, ("attn_output", "", "Q3_K")),
    "Q3_K_S": _EIGHT + _OUTPUT + (_OUT8,),
    "Q3_K_M": _EIGHT + _OUTPUT + (("attn_v", "wv<2", "Q5_K"), ("attn_v", "", "Q4_K"), ("ffn_down", "layer<n/16", "Q5_K"),
                                  ("ffn_down", "", "Q4_K"), _OUT8, ("attn_output", "", "Q4_K")),
    "Q3_K_L": _EIGHT + _OUTPUT + (("attn_v", "", "Q5_K"), ("ffn_down", "", "Q5_K"), ("attn_output", "", "Q5_K")),
    "Q4_K_S": _EIGHT + _OUTPUT + (("attn_v", "wv<4", "Q5_K"), ("ffn_down", "layer<n/8", "Q5_K"), _OUT8),
    "Q4_K_M": _EIGHT + _OUTPUT + (("attn_v", "wv_more_bits", "Q6_K"), ("ffn_down", "layer_more_bits", "Q6_K"), _OUT8),
    "Q5_K_S": _EIGHT + _OUTPUT,
    "Q5_K_M": _EIGHT + _OUTPUT + (("attn_v", "wv_more_bits", "Q6_K"), ("ffn_down", "layer_more_bits", "Q6_K")),
    "Q6_K": _EIGHT + _OUTPUT,
    "Q8_0": _EIGHT + (("output", "", "Q8_0"),),
    "IQ3_XXS": _EIGHT + _OUTPUT_LOW + (("token_embd", "", "IQ3_S"), ("attn_v", "gqa>=4", "Q4_K"),
                                       ("attn_v", "", "IQ3_XXS"), ("attn_k", "", "IQ2_S"), ("attn_q", "", "IQ2_S"),
                                       _OUT8, ("attn_output", "", "IQ3_S")),
    "IQ3_XS": _EIGHT + _OUTPUT + (("attn_v", "gqa>=4", "Q4_K"), ("attn_k", "", "IQ3_XXS"), ("attn_q", "", "IQ3_XXS"),
                                  ("ffn_gate", "layer_middle", "IQ3_XXS"), ("ffn_up", "layer_middle", "IQ3_XXS"), _OUT8),
    "IQ3_S": _EIGHT + _OUTPUT + (("attn_v", "gqa>=4", "Q4_K"), _OUT8),
    "IQ3_M": _EIGHT + _OUTPUT + (("attn_v", "", "Q4_K"), ("ffn_down", "layer<n/8|experts==8&layer_more_bits", "Q4_K"),
                                 _OUT8, ("attn_output", "", "Q4_K")),
    "IQ4_XS": _EIGHT + _OUTPUT + (("attn_v", "gqa>=4", "Q5_K"), _OUT8),
    "IQ4_NL": _EIGHT + _OUTPUT + (("attn_v", "gqa>=4", "Q5_K"), _OUT8),
}

# tensor_get_category: substrings of the GGUF name, first match wins (ffn_* also match _exps and _shexp). attn_qkv
# (Qwen3-Next's linear attention) is attn_v-like to llama.cpp (category_is_attn_v): counted and typed with attn_v.
_CATEGORIES = (("attn_qkv.weight", "attn_v"),
               ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
               ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"),
               ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"))


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    return next((c for s, c in _CATEGORIES if s in name), "other")


def _llama_quantizes(name: str, shape: tuple[int, ...]) -> bool:
    """tensor_allows_quantization for these architectures: 2-D and 3-D weights except norms and the router. ggml
    counts dimensions up to the last one above 1: Qwen2-MoE's (1, H) shared-expert gate is 1-D to it."""
    n_dims = len(shape) - next((i for i, d in enumerate(shape) if d != 1), len(shape))  # numpy order: ne reversed
    return (n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name and "ffn_gate_inp.weight" not in name
            and "ssm_conv1d" not in name)


def _more_bits(i: int, n: int) -> bool:  # llama.cpp's use_more_bits
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _holds(cond: str, ctx: dict[str, int]) -> bool:
    """A condition of RULES: '' always; alternatives split by '|', conjunctions by '&'."""
    if not cond:
        return True
    i, n, layer = ctx["index"], ctx["n_layers"], ctx["layer"]
    atoms = {
        "ragged": bool(ctx["ragged"]), "experts==8": ctx["experts"] == 8, "experts>=4": ctx["experts"] >= 4,
        "gqa>=4": ctx["gqa"] >= 4, "wv<2": i < 2, "wv<4": i < 4, "wv_more_bits": _more_bits(i, ctx["n_attn_v"]),
        "down<n/8": i < n // 8, "layer<n/8": layer < n // 8, "layer<n/16": layer < n // 16,
        "layer_more_bits": _more_bits(layer, n), "layer_middle": n // 8 <= layer < 7 * n // 8,
    }
    return any(all(atoms[a] for a in alt.split("&")) for alt in cond.split("|"))


def _gqa(view: CheckpointView) -> int:
    n_head = int(config_get(view.config, "num_attention_heads", default=1))
    return n_head // int(config_get(view.config, "num_key_value_heads", default=n_head))


def mixture_types(view: CheckpointView, ftype: str, n_experts: int | None = None,
                  outs: Sequence[OutTensor] | None = None) -> dict[str, T]:
    """GGUF tensor name → the type llama.cpp's mixture `ftype` writes it in (F32 for what it does not quantize).
    `n_experts` is the routed experts per layer in the file (after pruning; default the view's); `outs` is
    gguf_outputs(view) when the caller has it."""
    key = ftype.strip().upper()
    if key not in RULES:
        raise MoepackError(f"unknown llama.cpp mixture {ftype!r}; known: {', '.join(MIXTURES)}")
    base, rules = T[BASE[key]], RULES[key]
    outs = gguf_outputs(view) if outs is None else outs  # file order: llama.cpp's running indices follow it
    tied = not any(t.name == "output.weight" for t in outs)
    ctx = {"experts": n_experts or view.facts.n_experts, "gqa": _gqa(view), "n_layers": view.facts.n_layers,
           "n_attn_v": sum(category(t.name) == "attn_v" for t in outs)}
    seen: dict[str, int] = {}
    types: dict[str, T] = {}
    for t in outs:
        if not _llama_quantizes(t.name, t.shape):
            types[t.name] = T.F32
            continue
        cat = category(t.name)
        cat = "output" if cat == "token_embd" and tied else cat
        ctx |= {"index": seen.get(cat, 0), "layer": t.layer if t.layer is not None else 0,
                "ragged": t.shape[-1] % gguf.GGML_QUANT_SIZES[base][0]}
        seen[cat] = seen.get(cat, 0) + 1
        chosen = next((T[ty] for c, cond, ty in rules if c == cat and _holds(cond, ctx)), base)
        types[t.name] = fallback_type(chosen, t.shape[-1])
    return types


class MixtureSize(NamedTuple):
    total: int  # GGUF tensor data bytes
    routed: int  # of which routed experts
    gpu: int | None  # of which GPU-resident, when asked with `on_gpu`


def mixture_sizes(view: CheckpointView, keep: float = 1.0, ftypes: Sequence[str] = MIXTURES,
                  on_gpu: Callable[[str], bool] | None = None, outs: list[Any] | None = None
                  ) -> dict[str, MixtureSize]:
    """Mixture → its sizes for `view` with kept_count(keep) routed experts per MoE layer; `on_gpu(gguf name)`
    (moepack.stages.placement.on_gpu) splits off the GPU-resident bytes. Mixtures llama.cpp cannot write for this
    model (rows no fallback fits) are left out."""
    n_keep = kept_count(view, keep) if keep < 1.0 else view.facts.n_experts
    outs = gguf_outputs(view) if outs is None else outs  # `outs`: gguf_outputs(view), when the caller has it
    sizes = {}
    for ftype in ftypes:
        try:
            types = mixture_types(view, ftype, n_keep, outs)
        except MoepackError as e:  # a type without fallback on rows its blocks do not divide: llama.cpp refuses too
            log.info("llama.cpp cannot write %s as %s: %s", view.root, ftype, e)
            continue
        nbytes = {t.name: written_bytes((n_keep,) + t.shape[1:] if t.role is Role.ROUTED_EXPERTS else t.shape,
                                        types[t.name]) for t in outs}  # (E', rows, cols): pruning drops experts
        routed = sum(nbytes[t.name] for t in outs if t.role is Role.ROUTED_EXPERTS)
        gpu = sum(n for name, n in nbytes.items() if on_gpu(name)) if on_gpu else None
        sizes[ftype] = MixtureSize(sum(nbytes.values()), routed, gpu)
    return sizes
