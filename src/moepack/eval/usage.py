"""Expert usage per domain (`moepack usage`): which experts each kind of text routes to, per MoE layer.

Each domain's text goes through the calibrate stage (its routing counts; one run directory per domain, reused when
already there with the same inputs), so the numbers are the ones pruning would see had that domain been the
calibration text. An expert is *barely used* by a domain when it gets under a quarter of the uniform share of that
domain's routed token slots (1 / (4 E)): those are the experts a deployment on that domain could drop first.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moepack.atomic import atomic_write_text
from moepack.errors import MoepackError
from moepack.eval.plots import pyplot, save_figure
from moepack.stages.calibrate import run_calibrate

__all__ = ["BARELY", "UsageError", "DomainUsage", "domain_usage", "usage_chart", "usage_markdown", "write_usage"]

BARELY = 0.25  # barely used: under this fraction of the uniform share 1/E


class UsageError(MoepackError, ValueError):
    pass


@dataclass(frozen=True)
class DomainUsage:
    """Share of routed token slots per domain, MoE layer and expert: `share[d, l, e]` sums to 1 over e."""

    domains: tuple[str, ...]
    layers: tuple[int, ...]
    share: np.ndarray  # (D, L, E)
    tokens: dict[str, int]

    @property
    def n_experts(self) -> int:
        return self.share.shape[2]

    def barely_used(self) -> np.ndarray:
        """(D, L) fraction of experts that the domain barely uses in the layer."""
        return (self.share < BARELY / self.n_experts).mean(axis=2)

    def specialists(self, threshold: float = 0.5) -> np.ndarray:
        """(D, L) fraction of experts whose usage is mostly (> threshold of their summed shares) this domain's."""
        total = self.share.sum(axis=0, keepdims=True)  # (1, L, E)
        own = self.share / np.maximum(total, 1e-12)
        return (own > threshold).mean(axis=2)

    def to_dict(self) -> dict[str, Any]:
        return {"domains": list(self.domains), "layers": list(self.layers), "tokens": self.tokens,
                "barely_threshold": BARELY / self.n_experts,
                "share": {d: {str(L): [round(float(x), 6) for x in self.share[i, j]] for j, L in enumerate(self.layers)}
                          for i, d in enumerate(self.domains)},
                "barely_used": {d: [round(float(x), 4) for x in row] for d, row in zip(self.domains, self.barely_used())}}


def parse_texts(items: list[str]) -> dict[str, Path]:
    """`NAME=FILE` pairs (or bare FILEs, named by their stem) into an ordered mapping; names must be distinct."""
    out: dict[str, Path] = {}
    for item in items:
        name, _, path = item.rpartition("=") if "=" in item else (Path(item).stem, "", item)
        if not name or not path:
            raise UsageError(f"--calib-text {item!r}: give NAME=FILE, e.g. code=data/calib/code.txt")
        if name in out:
            raise UsageError(f"--calib-text: the domain name {name!r} is given twice; name each text differently")
        if not Path(path).is_file():
            raise UsageError(f"--calib-text {item!r}: file not found: {path}")
        out[name] = Path(path)
    if len(out) < 2:
        raise UsageError("give at least two --calib-text NAME=FILE domains to compare")
    return out


def domain_usage(model_dir: str | Path, texts: dict[str, Path], run_root: str | Path, *, tokens: int,
                 seq_len: int, batch_size: int = 8, threads: int | None = None, progress: bool = True) -> DomainUsage:
    """Calibrate on each domain's text (into RUN_ROOT/<domain>/) and collect its routing shares."""
    shares, tok = [], {}
    layers: tuple[int, ...] = ()
    for name, text in texts.items():
        stats = run_calibrate(model_dir, text, Path(run_root) / name, tokens=tokens, seq_len=seq_len,
                              selection_tokens=0, batch_size=batch_size, progress=progress, threads=threads)
        layers = tuple(sorted(stats.router))
        counts = np.stack([stats.router[L].counts for L in layers]).astype(np.float64)  # (L, E)
        shares.append(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1))
        tok[name] = int(stats.router[layers[0]].tokens)
    return DomainUsage(tuple(texts), layers, np.stack(shares), tok)


def usage_chart(u: DomainUsage, path: Path) -> None:
    """One heat map per MoE layer: domains × experts, experts ordered by the domain that uses them most."""
    plt = pyplot()
    n_l = len(u.layers)
    fig, axes = plt.subplots(n_l, 1, figsize=(max(6.0, 0.12 * u.n_experts + 3), 0.35 * len(u.domains) * n_l + 1.2 * n_l),
                             squeeze=False)
    vmax = float(u.share.max())
    for j, (ax, L) in enumerate(zip(axes[:, 0], u.layers)):
        s = u.share[:, j, :]  # (D, E)
        order = np.lexsort((-s.max(axis=0), s.argmax(axis=0)))  # grouped by favourite domain, busiest first
        im = ax.imshow(s[:, order], aspect="auto", cmap="magma", vmin=0.0, vmax=vmax)
        ax.set_yticks(range(len(u.domains)), list(u.domains), fontsize=8)
        ax.set_xticks([])
        ax.set_title(f"layer {L}: share of routed slots (uniform {1 / u.n_experts:.4f}); experts by favourite domain",
                     fontsize=9)
    fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.8)
    save_figure(fig, path)


def usage_markdown(u: DomainUsage, chart: str | None = None) -> str:
    """Per domain: tokens, share of experts barely used and share of specialist experts, per MoE layer."""
    layers = ", ".join(str(L) for L in u.layers)
    lines = [f"Expert usage per domain, MoE layers {layers}, {u.n_experts} routed experts each.", "",
             f"barely used: under {BARELY:g} of the uniform share (< {BARELY / u.n_experts:.5f} of the domain's routed "
             "slots); specialist: over half of the expert's summed usage comes from this domain.", "",
             "| domain | tokens | barely used, per layer | specialists, per layer |", "|---|---|---|---|"]
    for d, bu, sp in zip(u.domains, u.barely_used(), u.specialists()):
        lines.append(f"| {d} | {u.tokens[d]:,} | {' / '.join(f'{x:.0%}' for x in bu)} | "
                     f"{' / '.join(f'{x:.0%}' for x in sp)} |")
    if chart:
        lines += ["", f"![expert usage per domain]({chart})"]
    return "\n".join(lines) + "\n"


def write_usage(u: DomainUsage, out_dir: Path) -> dict[str, Path]:
    """usage.json, usage.md and usage.png in OUT_DIR."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "usage.json", "md": out_dir / "usage.md", "png": out_dir / "usage.png"}
    usage_chart(u, paths["png"])
    atomic_write_text(paths["json"], json.dumps(u.to_dict(), indent=1))
    atomic_write_text(paths["md"], usage_markdown(u, paths["png"].name))
    return paths
