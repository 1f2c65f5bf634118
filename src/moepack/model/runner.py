"""Layer-by-layer forward of a MoE checkpoint with transformers' own modules, one decoder layer in memory at a time.

`LayerRunner(view)` builds the transformers model on the meta device (no memory), then materialises one decoder
layer at a time from the checkpoint (per-expert tensors fused into transformers 5's in-memory layout), pushes all
hidden states through it and drops it. Peak memory is about one layer plus the hidden states.

Every weight goes through `LayerRunner.load_weight(name)` (checkpoint name → tensor) and then through an optional
`weight_override(name, tensor)`; wrap either to substitute weights (e.g. fake-quantized ones for sensitivity).

    runner = LayerRunner(view)
    h = runner.embed(ids)                      # (N, L, H)
    h = runner.run(h, 0, runner.n_layers)      # all decoder layers
    logits = runner.logits(h)                  # (N, L, V): final norm + lm_head
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from moepack.errors import MoepackError
from moepack.model import metrics
from moepack.model.arch import Role, beyond_decoder
from moepack.model.checkpoint import CheckpointView
from moepack.model.stored import FusedSplit, fused_members, join_fused

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "WeightOverride",
    "LayerPrepare",
    "ParamSource",
    "LayerRunner",
    "hf_config",
    "layer_sources",
    "moe_prefix",
    "moe_layers",
    "KLDReference",
]

log = logging.getLogger(__name__)

# (checkpoint tensor name, loaded tensor) -> replacement, or None to keep the tensor as loaded.
WeightOverride = Callable[[str, torch.Tensor], "torch.Tensor | None"]
# Called with (layer index, freshly built layer module) before any hidden state goes through it.
LayerPrepare = Callable[[int, "nn.Module"], None]

_LAYER = "model.layers.{}."


class ForwardError(MoepackError, ValueError):
    """The checkpoint does not fit the transformers model class built from its config."""


@dataclass(frozen=True)
class ParamSource:
    """How one parameter of a transformers decoder layer is built from checkpoint tensors.

    fuse: "copy" (one tensor), "gate_up" (stack over experts of cat(gate_e, up_e): (E, 2I, H)),
    "down" (stack over experts: (E, H, I)) or "split" (the inverse of the architecture's FusedSplit `split`: the
    stacked tensor as the checkpoint stores it, which is transformers' in-memory layout for gpt-oss / Llama 4).
    For fused sources `names` holds gate_0..gate_{E-1}, up_0.. (gate_up), down_0..down_{E-1}, or for "split"
    each expert's outputs in turn (e0 out0, e0 out1, e1 out0, ...).
    """

    key: str
    names: tuple[str, ...]
    fuse: str = "copy"
    split: FusedSplit | None = None


def moe_prefix(view: CheckpointView) -> str:
    """The checkpoint's name of the MoE block inside a layer ("mlp"; Mixtral: "block_sparse_moe")."""
    for rule in view.spec.rules:
        if rule.role is Role.ROUTER and rule.kind == "router" and rule.template.endswith(".gate.weight"):
            return rule.template.split("{bid}.", 1)[1].rsplit(".gate.weight", 1)[0]
    return "mlp"  # gpt-oss (mlp.router); Llama 4 (feed_forward.router: in-memory keys keep that name)


def moe_layers(view: CheckpointView) -> tuple[int, ...]:
    """MoE layers of the served model (without DeepSeek-V3's multi-token-prediction layer)."""
    return tuple(i for i in view.facts.moe_layers if not beyond_decoder(i, view.facts.n_layers))


def hf_config(view: CheckpointView, overrides: dict[str, Any] | None = None, attn_implementation: str = "sdpa",
              experts_implementation: str | None = None):  # -> transformers.PretrainedConfig
    """The transformers config of `view` (from its config dict, so lazily remapped views work too)."""
    import transformers

    cfg = dict(view.config)
    cfg.update(overrides or {})
    model_type = view.spec.extra.get("hf_model_type", cfg.pop("model_type"))  # Kimi-K2 runs as deepseek_v3
    cfg.pop("model_type", None)
    for k in ("transformers_version", "architectures", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    for src, dst in view.spec.extra.get("hf_config_keys", {}).items():  # Hunyuan's release: attention_head_dim
        if cfg.get(dst) is None and cfg.get(src) is not None:
            cfg[dst] = cfg[src]
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    # gpt-oss: attention sinks exist only in transformers' eager (and flex) attention
    config._attn_implementation = view.spec.extra.get("attn_implementation", attn_implementation)
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    return config


def layer_sources(view: CheckpointView, layer: int) -> dict[str, ParamSource]:
    """In-memory parameter key of decoder layer `layer` → the checkpoint tensors it is built from."""
    prefix = _LAYER.format(layer)
    moe = moe_prefix(view)
    out: dict[str, ParamSource] = {}
    experts: dict[str, dict[int, str]] = {}
    for ref in view.tensors.values():
        if ref.layer != layer:
            continue
        if ref.role is Role.ROUTED_EXPERTS:
            experts.setdefault(ref.kind, {})[int(ref.expert)] = ref.name
            continue
        key = ref.name[len(prefix):]
        if moe != "mlp" and key.startswith(moe + "."):
            key = "mlp." + key[len(moe) + 1:]
        key = view.spec.extra.get("hf_keys", {}).get(key, key)  # ERNIE: transformers renames its router statics
        out[key] = ParamSource(key, (ref.name,))
    if experts and view.spec.fused:
        out.update(_split_sources(view, layer, prefix, experts))
    elif experts:
        gate, up, down = view.spec.expert_projs
        n = view.facts.n_experts
        for kind in (gate, up, down):
            got = experts.get(kind, {})
            if sorted(got) != list(range(n)):
                raise ForwardError(f"{view.root}: layer {layer} has {kind} for experts {sorted(got)[:8]}..., "
                                   f"expected 0..{n - 1}")
        gu = tuple(experts[gate][e] for e in range(n)) + tuple(experts[up][e] for e in range(n))
        out["mlp.experts.gate_up_proj"] = ParamSource("mlp.experts.gate_up_proj", gu, "gate_up")
        dn = tuple(experts[down][e] for e in range(n))
        out["mlp.experts.down_proj"] = ParamSource("mlp.experts.down_proj", dn, "down")
    return out


def _split_sources(view: CheckpointView, layer: int, prefix: str,
                   experts: dict[str, dict[int, str]]) -> dict[str, ParamSource]:
    """Stacked expert parameters of an architecture whose checkpoints fuse experts: each FusedSplit's stacked
    tensor, rebuilt from the (possibly pruned and renumbered) per-expert tensors."""
    n = view.facts.n_experts
    have = {name for by_e in experts.values() for name in by_e.values()}
    out: dict[str, ParamSource] = {}
    for split in view.spec.fused:
        members = fused_members(split, layer, n)
        flat = tuple(name for per in members for name in per)
        missing = [name for name in flat if name not in have]
        if missing:
            raise ForwardError(f"{view.root}: layer {layer} lacks {missing[0]} ({len(missing)} per-expert tensors "
                               f"of {split.template} missing; expected experts 0..{n - 1})")
        key = split.template.replace("{bid}", str(layer))[len(prefix):]
        out[key] = ParamSource(key, flat, "split", split)
    return out


class LayerRunner:
    """Runs a checkpoint through transformers' own decoder layers, one layer in memory at a time.

    dtype: compute dtype (float32 by default: calibration and KLD want it; bf16 halves memory).
    config_overrides: changes to config.json before the model is built (e.g. {"num_experts_per_tok": 3}).
    loader: replaces `view.load` as the source of checkpoint tensors.
    """

    def __init__(self, view: CheckpointView, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 config_overrides: dict[str, Any] | None = None, attn_implementation: str = "sdpa",
                 experts_implementation: str | None = None,
                 loader: Callable[[str], torch.Tensor] | None = None) -> None:
        import transformers

        self.view = view
        self.dtype = dtype
        self.device = torch.device(device)
        self.config = hf_config(view, config_overrides, attn_implementation, experts_implementation)
        self._loader = loader
        with torch.device("meta"):
            self._skeleton = transformers.AutoModelForCausalLM.from_config(self.config)
        self.n_layers = int(self.config.num_hidden_layers)
        if "shared" in (getattr(self.config, "indexer_types", None) or ()):  # GLM-5.2
            raise ForwardError(f"{view.root}: layers that reuse the previous layer's DSA top-k (indexer_types "
                               "'shared') need state carried across layers, which the layer runner does not do yet")
        rotary = self._skeleton.model.rotary_emb
        self._rotary = type(rotary)(config=self.config).to(self.device)
        self._head: tuple[nn.Module, nn.Module] | None = None
        self._norm: nn.Module | None = None
        self._pos_cache: dict[tuple[int, int], tuple[Any, Any, dict[str, Any]]] = {}

    # ---- weights -------------------------------------------------------------------------------------------
    def load_weight(self, name: str) -> torch.Tensor:
        """The one place checkpoint tensors are read; wrap or subclass to substitute weights."""
        return (self._loader or self.view.load)(name)

    def _tensor(self, name: str, override: WeightOverride | None) -> torch.Tensor:
        t = self.load_weight(name)
        if override is not None:
            new = override(name, t)
            if new is not None:
                t = new
        return t.to(device=self.device, dtype=self.dtype)

    def _build(self, src: ParamSource, override: WeightOverride | None) -> torch.Tensor:
        if src.fuse == "copy":
            return self._tensor(src.names[0], override)
        if src.fuse == "split":
            k = len(src.split.outputs)
            names = [list(src.names[i:i + k]) for i in range(0, len(src.names), k)]  # [expert][output]
            return join_fused(src.split, names, lambda name: self._tensor(name, override))
        if src.fuse not in ("gate_up", "down"):
            raise ValueError(src.fuse)
        # Fill a preallocated stack expert by expert: peak is the fused tensor plus one expert's matrix.
        n = len(src.names) // 2 if src.fuse == "gate_up" else len(src.names)
        out: torch.Tensor | None = None
        for j, name in enumerate(src.names):
            t = self._tensor(name, override)  # (I, H) gate/up, (H, I) down
            if out is None:
                rows = t.shape[0] * (2 if src.fuse == "gate_up" else 1)
                out = torch.empty((n, rows, t.shape[1]), dtype=t.dtype, device=t.device)  # (E, 2I, H) | (E, H, I)
            e, half = j % n, j // n  # gate_up: names are gate_0..gate_{E-1}, up_0..up_{E-1}
            out[e, half * t.shape[0]:(half + 1) * t.shape[0]] = t
            del t
        return out

    def _materialize(self, meta: nn.Module, sources: dict[str, ParamSource], what: str,
                     override: WeightOverride | None) -> nn.Module:
        module = copy.deepcopy(meta)
        expected = set(module.state_dict().keys())
        missing = sorted(expected - set(sources))
        extra = sorted(set(sources) - expected)
        if missing or extra:
            raise ForwardError(f"{self.view.root}: {what} does not match transformers' "
                               f"{type(module).__name__}: missing {missing[:4]}, unexpected {extra[:4]}")
        sd = {k: self._build(sources[k], override) for k in expected}
        module.load_state_dict(sd, strict=True, assign=True)
        return module.eval()

    def layer(self, i: int, weight_override: WeightOverride | None = None) -> nn.Module:
        """Decoder layer `i` with its weights loaded (the caller drops it when done)."""
        meta = self._skeleton.model.layers[i]
        return self._materialize(meta, layer_sources(self.view, i), f"layer {i}", weight_override)

    def _top(self, meta: nn.Module, name: str, override: WeightOverride | None) -> nn.Module:
        key = next(iter(meta.state_dict()))  # "weight"
        if name not in self.view.tensors and name == "lm_head.weight" and self.config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        if name not in self.view.tensors:
            raise ForwardError(f"{self.view.root}: checkpoint lacks {name}")
        return self._materialize(meta, {key: ParamSource(key, (name,))}, name, override)

    def release(self) -> None:
        """Drop the cached final norm and lm_head."""
        self._head = self._norm = None

    # ---- forward -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, ids: torch.Tensor, weight_override: WeightOverride | None = None) -> torch.Tensor:
        """Token ids (N, L) → hidden states (N, L, H) in the compute dtype."""
        ids = torch.as_tensor(ids, device=self.device)
        if weight_override is None:  # gather the rows used: no (V, H) float32 copy of a large vocabulary
            w = self.load_weight("model.embed_tokens.weight")  # (V, H) as stored
            return torch.nn.functional.embedding(ids, w).to(device=self.device, dtype=self.dtype)  # (N, L, H)
        emb = self._top(self._skeleton.model.embed_tokens, "model.embed_tokens.weight", weight_override)
        return emb(ids)  # (N, L, H)

    def _positions(self, hidden: torch.Tensor) -> tuple[Any, Any, dict[str, Any]]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        b, n = hidden.shape[:2]
        if (b, n) not in self._pos_cache:
            pos = torch.arange(n, device=self.device).unsqueeze(0)  # (1, L)
            pe = self._rotary(hidden, pos)
            kw = dict(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=pos)
            masks = {"full_attention": create_causal_mask(**kw)}
            if self._uses_sliding():
                masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
            if "chunked_attention" in (getattr(self.config, "layer_types", None) or ()):  # Llama 4
                from transformers.masking_utils import create_chunked_causal_mask

                masks["chunked_attention"] = create_chunked_causal_mask(**kw)
            if "indexed_attention" in (getattr(self.config, "layer_types", None) or ()):  # GLM-5's DSA layers
                # a materialised causal mask, as transformers builds it: the indexer reads it
                masks["indexed_attention"] = create_causal_mask(**kw, allow_is_causal_skip=False)
            if "linear_attention" in (getattr(self.config, "layer_types", None) or ()):
                masks["linear_attention"] = None  # recurrent layers mask only padding, and no sequence is padded
            self._pos_cache = {(b, n): (pos, pe, masks)}
        return self._pos_cache[(b, n)]

    def _uses_sliding(self) -> bool:
        types = getattr(self.config, "layer_types", None)
        if types:
            return "sliding_attention" in types
        return getattr(self.config, "sliding_window", None) is not None

    def _mask_for(self, i: int, masks: dict[str, Any]) -> Any:
        types = getattr(self.config, "layer_types", None)
        if types:
            return masks[types[i]]
        return masks["sliding_attention" if self._uses_sliding() else "full_attention"]

    def _batches(self, n: int, batch_size: int) -> Iterator[slice]:
        for b0 in range(0, n, batch_size):
            yield slice(b0, min(n, b0 + batch_size))

    @torch.inference_mode()
    def run(self, hidden: torch.Tensor, start: int = 0, end: int | None = None, *,
            weight_override: WeightOverride | None = None, batch_size: int = 8, prepare: LayerPrepare | None = None,
            inplace: bool = False, progress: bool | str = False) -> torch.Tensor:
        """Hidden states (N, L, H) entering layer `start` → hidden states leaving layer `end - 1`.

        Each layer is loaded once, all N sequences go through it in batches of `batch_size`, then it is dropped.
        `prepare(i, layer)` may register hooks on the fresh layer. With `inplace`, `hidden` is overwritten.
        """
        end = self.n_layers if end is None else end
        if not 0 <= start <= end <= self.n_layers:
            raise ValueError(f"layer range [{start}, {end}) outside 0..{self.n_layers}")
        out = hidden if inplace else hidden.clone()
        desc = progress if isinstance(progress, str) else "layers"
        for i in tqdm(range(start, end), desc=desc, unit="layer", disable=not progress):
            layer = self.layer(i, weight_override)
            if prepare is not None:
                prepare(i, layer)
            for sl in self._batches(out.shape[0], batch_size):
                h = out[sl]
                pos, pe, masks = self._positions(h)
                y = layer(h, attention_mask=self._mask_for(i, masks), position_ids=pos, position_embeddings=pe)
                out[sl] = y[0] if isinstance(y, tuple) else y  # GLM-5's layers also return their DSA top-k
            del layer
        return out

    def _norm_module(self) -> nn.Module:
        if self._norm is None:
            self._norm = self._top(self._skeleton.model.norm, "model.norm.weight", None)
        return self._norm

    def _head_modules(self) -> tuple[nn.Module, nn.Module]:
        if self._head is None:  # lm_head is loaded only when logits are wanted: (V, H) f32 is large
            self._head = (self._norm_module(), self._top(self._skeleton.lm_head, "lm_head.weight", None))
        return self._head

    @torch.inference_mode()
    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's final norm: hidden states after the last layer (..., H) → lm_head input (..., H)."""
        return self._norm_module()(hidden)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states after the last layer (N, L, H) → logits (N, L, V) in float32."""
        norm, head = self._head_modules()
        return head(norm(hidden)).float()

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, batch_size: int = 8, progress: bool | str = False) -> torch.Tensor:
        """Full model: token ids (N, L) → logits (N, L, V). Mind the size of the logits for large vocabularies."""
        h = self.run(self.embed(ids), batch_size=batch_size, inplace=True, progress=progress)
        return self.logits(h)


class KLDReference:
    """The reference model's outputs on fixed token ids (N, L), for measuring variants against it.

    Caches the hidden states entering layer `start` (a variant that differs only from there on restarts there) and
    the reference's final hidden states (logits are recomputed batch by batch, never all stored).
    `variant(runner, weight_override)` runs a variant from `start` and returns its mean KLD, p99 KLD, top-1
    agreement and perplexity; the variant's own final norm and lm_head are used.
    """

    def __init__(self, runner: LayerRunner, ids: torch.Tensor, start: int = 0, batch_size: int = 8,
                 progress: bool | str = False) -> None:
        self.runner, self.start, self.batch_size = runner, start, batch_size
        self.ids = torch.as_tensor(ids)  # (N, L)
        with torch.inference_mode():
            self.h_start = runner.run(runner.embed(self.ids), 0, start, batch_size=batch_size, inplace=True)
            self.h_final = runner.run(self.h_start, start, None, batch_size=batch_size, progress=progress)
        self.base = self.compare(self.h_final, runner)

    @torch.inference_mode()
    def compare(self, h_final: torch.Tensor, runner: LayerRunner | None = None) -> dict[str, float]:
        """Metrics of final hidden states (N, L, H) from a variant whose head is `runner`'s (default: reference)."""
        runner = runner or self.runner
        mean, kld, agree, nll = metrics.KLDMean(), [], [], []
        for b0 in range(0, h_final.shape[0], self.batch_size):
            sl = slice(b0, b0 + self.batch_size)
            ref, got = self.runner.logits(self.h_final[sl]), runner.logits(h_final[sl])  # (B, L, V)
            k = metrics.token_kld(metrics.log_probs(ref), metrics.log_probs(got))  # (B, L)
            mean.add(k)
            kld.append(k.reshape(-1))
            agree.append(metrics.top1_agree(ref, got).reshape(-1).float())
            tgt = self.ids[sl, 1:]  # (B, L-1)
            nll.append(metrics.nll(metrics.log_probs(got[:, :-1]), tgt).reshape(-1))
        self.last_tokens = torch.cat(kld).double().reshape(h_final.shape[:2]).numpy()  # (N, L) per-token KLD
        return dict(kld_mean=mean.mean, kld_p99=float(torch.quantile(torch.cat(kld), 0.99)),
                    top1_agree=float(torch.cat(agree).mean()), ppl=metrics.ppl(torch.cat(nll)))

    @torch.inference_mode()
    def variant(self, runner: LayerRunner, weight_override: WeightOverride | None = None,
                progress: bool | str = False) -> dict[str, float]:
        h = runner.run(self.h_start, self.start, None, weight_override=weight_override,
                       batch_size=self.batch_size, progress=progress)
        return self.compare(h, runner)
