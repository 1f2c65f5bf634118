"""The calibration artifact: calib/manifest.json (CalibManifest, "moepack.calib/1") and calib/stats.safetensors
(router statistics per MoE layer, the importance matrix, the held-out token ids)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from moepack.atomic import atomic_path, atomic_write_text
from moepack.schema.base import CALIB_FORMAT, SchemaError, read_json

__all__ = ["CalibInputs", "CalibManifest", "RouterStats", "ImatrixEntry", "CalibStats", "calib_dir"]

log = logging.getLogger(__name__)


_LEGACY = {"heldout_requested": "selection_requested", "heldout_tokens": "selection_tokens"}


@dataclass(frozen=True)
class CalibInputs:
    """What `moepack calibrate` was asked for; a rerun with the same inputs reuses the statistics."""

    model: str
    text: str
    text_sha256: str
    tokens_requested: int
    seq_len_requested: int
    selection_requested: int
    shards: int | None = None  # an input only when given: the default takes statistics of any shard count
    report_requested: int = 0  # held-out tokens after the held-out ones, for a report no choice saw (compress)
    # Several named texts (moepack.model.textdata.CalibSource.record: name, path, sha256, chat): each domain's
    # selection and report tokens keep its name. None: one plain text (`text`), as before domains existed.
    domains: list[dict[str, Any]] | None = None

    @property
    def domain_names(self) -> list[str]:
        return [str(d["name"]) for d in self.domains] if self.domains else []

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.shards is None:
            del d["shards"]
        if not self.report_requested:  # absent from manifests written before it existed
            del d["report_requested"]
        if self.domains is None:
            del d["domains"]
        return d

    def matches(self, manifest: CalibManifest) -> bool:
        """Whether statistics with `manifest` answer these inputs (the model is checked by fingerprint)."""
        have = manifest.inputs.to_dict() if manifest.inputs is not None else {}
        have["shards"] = manifest.shards
        return all(have.get(k) == v for k, v in self.to_dict().items() if k != "model")


@dataclass(frozen=True)
class CalibManifest:
    """calib/manifest.json: how the statistics were made. Written last: its presence marks a complete artifact."""

    fingerprint: str
    arch: str
    tokens: int
    seq_len: int
    n_sequences: int
    top_k: int
    n_experts: int
    moe_layers: list[int]
    never_routed: dict[str, list[int]]
    rarely_routed: dict[str, list[int]]
    selection_tokens: int
    shards: int
    batch_size: int
    threads: int
    backend: str
    seconds: float
    inputs: CalibInputs | None = None

    @property
    def text(self) -> str | None:
        return self.inputs.text if self.inputs is not None else None

    @property
    def text_sha256(self) -> str | None:
        return self.inputs.text_sha256 if self.inputs is not None else None

    @property
    def model(self) -> str | None:
        return self.inputs.model if self.inputs is not None else None

    def to_dict(self) -> dict[str, Any]:
        # The inputs first, then the facts; a requested "shards" keeps its place and holds the shards run.
        d = self.inputs.to_dict() if self.inputs is not None else {}
        d.update(format=CALIB_FORMAT, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "inputs"})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: Path | str = "manifest") -> CalibManifest:
        if isinstance(d, dict):  # manifests written before the glossary named them selection tokens
            d = {_LEGACY.get(k, k): v for k, v in d.items()}
        if not isinstance(d, dict) or d.get("format") != CALIB_FORMAT:
            got = d.get("format") if isinstance(d, dict) else None
            raise SchemaError(f"{where}: not a moepack calibration ({got!r}); rerun moepack calibrate")
        try:
            inputs = None
            if "model" in d:
                keys = list(d)
                asked = "shards" in d and keys.index("shards") < keys.index("format")  # among the inputs
                inputs = CalibInputs(d["model"], d["text"], d["text_sha256"], d["tokens_requested"],
                                     d["seq_len_requested"], d["selection_requested"], d["shards"] if asked else None,
                                     d.get("report_requested", 0), d.get("domains"))
            facts = {f.name: d[f.name] for f in fields(cls) if f.name != "inputs"}
        except KeyError as e:
            raise SchemaError(f"{where}: the calibration manifest lacks {e}; rerun moepack calibrate") from None
        return cls(**facts, inputs=inputs)

    @classmethod
    def read(cls, directory: Path) -> CalibManifest:
        path = Path(directory) / "manifest.json"
        return cls.from_dict(read_json(path, "calibration manifest"), path)


@dataclass
class RouterStats:
    """One MoE layer's routing statistics over `tokens` tokens with `top_k` routed slots each."""

    counts: np.ndarray  # (E,) routed token slots per expert
    weight_sum: np.ndarray  # (E,) sum of the weights multiplying the expert's output (after norm and scaling)
    saliency_sum: np.ndarray  # (E,) sum of weight × ‖expert output‖₂
    tokens: int
    top_k: int
    # (E, E) Σ over a fixed sample of the layer's tokens of y_e·y_f, every expert applied to every sampled token
    # (stages.merge's output similarity); None in statistics written before it was recorded
    out_gram: np.ndarray | None = None

    @property
    def freq(self) -> np.ndarray:
        """f_e: share of routed token slots (sums to 1 over the experts)."""
        return self.counts / max(1, self.tokens * self.top_k)

    @property
    def score(self) -> np.ndarray:
        """s_e: mean routing weight when selected; 0 for a never-routed expert."""
        return self.weight_sum / np.maximum(self.counts, 1)

    @property
    def saliency(self) -> np.ndarray:
        """REAP saliency: mean over routed tokens of weight × ‖expert output‖₂; 0 for a never-routed expert."""
        return self.saliency_sum / np.maximum(self.counts, 1)


@dataclass
class ImatrixEntry:
    """Sum of squared inputs per input column, per matrix: M = experts (stacked) or 1."""

    sums: np.ndarray  # (M, n)
    counts: np.ndarray  # (M,) tokens seen by each matrix

    def mean(self) -> np.ndarray:
        """Mean squared input (M, n); a matrix that saw no token gets ones, as llama-quantize does."""
        c = self.counts[:, None]  # (M, 1)
        return np.where(c > 0, self.sums / np.maximum(c, 1), 1.0).astype(np.float32)


def calib_dir(path: str | Path) -> Path:
    """A run directory or its `calib/` subdirectory → the directory holding manifest.json."""
    p = Path(path)
    for d in (p / "calib", p):
        if (d / "manifest.json").is_file() and (d / "stats.safetensors").is_file():
            return d
    raise SchemaError(f"{p}: no calibration statistics (calib/manifest.json); run `moepack calibrate ... -o {p}`")


@dataclass
class CalibStats:
    """The calibration artifact: manifest, router statistics per MoE layer, importance matrix, held-out ids."""

    manifest: CalibManifest
    router: dict[int, RouterStats]
    imatrix: dict[str, ImatrixEntry]  # checkpoint tensor name; a layer's experts stacked under model.arch.expert_key
    selection: np.ndarray | None = None  # (n, L) token ids kept out of the statistics (for KLD checks)
    report: np.ndarray | None = None  # (m, L) further held-out ids, after `selection`: for a result no choice saw
    # (n,) and (m,): each sequence's domain, an index into manifest.inputs.domain_names (None: one domain)
    selection_domain: np.ndarray | None = None
    report_domain: np.ndarray | None = None
    # per domain, the KLD level every mean KLD on the selection tokens divides its domain by (compress measures it:
    # moepack.pipeline.search.CandidateSearch.balance); not stored. None: every token weighs alike
    domain_scales: np.ndarray | None = None

    def selection_weights(self, n: int | None = None) -> np.ndarray | None:
        """Per sequence of the first `n` selection sequences (default all): its weight in a mean KLD, so that the
        mean is the average over domains of each domain's mean KLD over its scale, times the scales' mean (for a plan
        at the scales' levels it equals its plain mean); None without domain scales."""
        if self.domain_scales is None or self.selection_domain is None:
            return None
        labels = self.selection_domain[: len(self.selection_domain) if n is None else n]
        scales = np.asarray(self.domain_scales, dtype=np.float64)
        present = np.unique(labels)
        counts = np.bincount(labels, minlength=len(scales)).astype(np.float64)  # (D,)
        return scales[present].mean() / scales[labels] * len(labels) / (len(present) * counts[labels])  # (n,)

    @property
    def domain_names(self) -> list[str]:
        return self.manifest.inputs.domain_names if self.manifest.inputs is not None else []

    def write(self, out: Path) -> None:
        """calib/stats.safetensors, then calib/manifest.json (last: it marks the artifact complete)."""
        from safetensors.numpy import save_file

        arrays: dict[str, np.ndarray] = {}
        for layer, r in self.router.items():
            arrays[f"router.{layer}.counts"] = r.counts.astype(np.float64)
            arrays[f"router.{layer}.weight_sum"] = r.weight_sum.astype(np.float64)
            arrays[f"router.{layer}.saliency_sum"] = r.saliency_sum.astype(np.float64)
            if r.out_gram is not None:
                arrays[f"router.{layer}.out_gram"] = r.out_gram.astype(np.float64)
        for key, e in self.imatrix.items():
            arrays[f"imatrix.{key}.in_sum2"] = np.ascontiguousarray(e.sums, dtype=np.float32)
            arrays[f"imatrix.{key}.counts"] = e.counts.astype(np.float64)
        if self.selection is not None:
            arrays["selection_ids"] = np.ascontiguousarray(self.selection, dtype=np.int64)
        if self.report is not None:
            arrays["report_ids"] = np.ascontiguousarray(self.report, dtype=np.int64)
        for key, labels in (("selection_domain", self.selection_domain), ("report_domain", self.report_domain)):
            if labels is not None:
                arrays[key] = np.ascontiguousarray(labels, dtype=np.int64)
        with atomic_path(Path(out) / "stats.safetensors") as tmp:
            save_file(arrays, str(tmp))
        atomic_write_text(Path(out) / "manifest.json", json.dumps(self.manifest.to_dict(), indent=2))

    @classmethod
    def read(cls, path: str | Path) -> CalibStats:
        """The statistics of a run directory or its calib/ folder."""
        from safetensors.numpy import load_file

        d = calib_dir(path)
        manifest = CalibManifest.read(d)
        arrays = load_file(str(d / "stats.safetensors"))
        router = {int(layer): RouterStats(arrays[f"router.{layer}.counts"], arrays[f"router.{layer}.weight_sum"],
                                          arrays[f"router.{layer}.saliency_sum"], manifest.tokens, manifest.top_k,
                                          arrays.get(f"router.{layer}.out_gram"))
                  for layer in manifest.moe_layers}
        imatrix: dict[str, ImatrixEntry] = {}
        for k, v in arrays.items():
            if k.startswith("imatrix.") and k.endswith(".in_sum2"):
                key = k[len("imatrix."):-len(".in_sum2")]
                imatrix[key] = ImatrixEntry(v.astype(np.float64), arrays[f"imatrix.{key}.counts"])
        return cls(manifest, router, imatrix, arrays.get("selection_ids", arrays.get("heldout_ids")),
                   arrays.get("report_ids"), arrays.get("selection_domain"), arrays.get("report_domain"))
