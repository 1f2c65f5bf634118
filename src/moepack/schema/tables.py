"""sensitivity.json ("moepack.sensitivity/1", read by allocate; layout in moepack.stages.allocate) and
quant_plan.json (allocate's output, or a plan written by hand; read by the GGUF writer and the report)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from moepack.atomic import save_json
from moepack.schema.base import SENSITIVITY_FORMAT, SchemaError, read_json

__all__ = ["Option", "Group", "SensitivityTable", "QuantPlan"]

log = logging.getLogger(__name__)


def _num(x: Any, what: str, integer: bool = False) -> Any:
    ok = isinstance(x, int) if integer else isinstance(x, (int, float))
    if not ok or isinstance(x, bool) or (not integer and not math.isfinite(x)) or (integer and x < 0):
        kind = "a non-negative integer" if integer else "a finite number"
        raise SchemaError(f"sensitivity table: {what} must be {kind} (got {x!r})")
    return x


@dataclass(frozen=True)
class Option:
    type: str
    bytes: int  # the group's tensor data at this type, after llama.cpp's row-width fallbacks
    dkld: float  # change of KLD vs the all-base model when only this group is moved to `type`
    kld: float | None = None  # measured KLD of that model (KLD mode)
    proxy: float | None = None  # weighted quantization error proxy
    written: dict[str, str] | None = None  # tensor → type written, where a fallback replaced `type`
    # ΔKLD per calibration domain (plain means over each domain's selection tokens; the table's base["domains"]
    # names them and gives the coefficients whose weighted sum is dkld); None with one domain
    domains: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type, "bytes": self.bytes, "dkld": self.dkld}
        d.update({k: v for k, v in (("kld", self.kld), ("proxy", self.proxy), ("written", self.written))
                  if v is not None})
        if self.domains is not None:
            d["domains"] = list(self.domains)
        return d


@dataclass(frozen=True)
class Group:
    name: str
    tensors: tuple[str, ...]
    options: tuple[Option, ...]  # options[0] is the base (dkld 0); the others may be smaller (downgrades) or larger
    cls: str | None = None  # gguf tensor class ("ffn_down_exps"); with role and layer, as sensitivity writes them
    role: str | None = None
    layer: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.cls is not None:
            d.update({"class": self.cls, "role": self.role, "layer": self.layer})
        return d | {"tensors": list(self.tensors), "options": [o.to_dict() for o in self.options]}


def _option(d: Any, where: str) -> Option:
    if not isinstance(d, dict) or not isinstance(d.get("type"), str) or not d["type"]:
        raise SchemaError(f"sensitivity table: {where}: an option needs a \"type\" name, \"bytes\" and \"dkld\"")
    measured = {k: d.get(k) for k in ("kld", "proxy")}
    for k, v in measured.items():
        if v is not None:
            _num(v, f"{where} {d['type']} {k}")
    written = d.get("written")
    if written is not None and not (isinstance(written, dict) and all(isinstance(v, str) for v in written.values())):
        raise SchemaError(f"sensitivity table: {where} {d['type']}: \"written\" must map tensor names to type names")
    domains = d.get("domains")
    if domains is not None:
        if not isinstance(domains, list):
            raise SchemaError(f"sensitivity table: {where} {d['type']}: \"domains\" must be a list of numbers")
        domains = tuple(float(_num(x, f"{where} {d['type']} domains")) for x in domains)
    return Option(d["type"], _num(d.get("bytes"), f"{where} {d['type']} bytes", True),
                  float(_num(d.get("dkld"), f"{where} {d['type']} dkld")), measured["kld"], measured["proxy"], written,
                  domains)


def _group(d: Any, i: int) -> Group:
    if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not d["name"]:
        raise SchemaError(f"sensitivity table: group #{i} needs a \"name\"")
    name = d["name"]
    tensors = d.get("tensors")
    if not isinstance(tensors, list) or not tensors or not all(isinstance(t, str) and t for t in tensors):
        raise SchemaError(f"sensitivity table: group {name}: \"tensors\" must be a non-empty list of names")
    raw = d.get("options")
    if not isinstance(raw, list) or not raw:
        raise SchemaError(f"sensitivity table: group {name}: \"options\" must be a non-empty list")
    opts = tuple(_option(o, f"group {name}") for o in raw)
    if len({o.type for o in opts}) != len(opts):
        raise SchemaError(f"sensitivity table: group {name} lists a type twice")
    if opts[0].dkld != 0.0:
        raise SchemaError(f"sensitivity table: group {name}: the first (base) option must have dkld 0 "
                          f"(got {opts[0].dkld}); dkld is measured relative to the all-base model")
    return Group(name, tuple(tensors), opts, d.get("class"), d.get("role"), d.get("layer"))


@dataclass(frozen=True)
class SensitivityTable:
    """sensitivity.json; its layout is documented in moepack.stages.allocate."""

    groups: tuple[Group, ...]
    fixed_bytes: int = 0  # tensor bytes outside every group (norms, routers, biases at F32)
    base: dict[str, Any] = field(default_factory=dict)  # free-form, copied into the plan ("kld": all-base KLD)
    fixed: dict[str, str] = field(default_factory=dict)
    overhead_bytes: int | None = None  # GGUF bytes that are not tensor data
    format: str | None = None  # SENSITIVITY_FORMAT when written by moepack sensitivity
    proxy: dict[str, Any] | None = None  # proxy weighting and its rank agreement with the KLD
    timing: dict[str, Any] | None = None

    @property
    def min_bytes(self) -> int:
        """The smallest achievable tensor data: every group at its smallest option, plus the fixed tensors."""
        return self.fixed_bytes + sum(min(o.bytes for o in g.options) for g in self.groups)

    @property
    def max_bytes(self) -> int:
        return self.fixed_bytes + sum(max(o.bytes for o in g.options) for g in self.groups)

    @classmethod
    def from_dict(cls, d: Any) -> SensitivityTable:
        if not isinstance(d, dict) or not isinstance(d.get("groups"), list):
            raise SchemaError("sensitivity table: expected a JSON object with a \"groups\" list")
        if d.get("version", 1) != 1:
            raise SchemaError(f"sensitivity table: version {d.get('version')!r} is not supported (this moepack "
                              "reads version 1); rerun `moepack sensitivity`")
        groups = tuple(_group(g, i) for i, g in enumerate(d["groups"]))
        seen: dict[str, str] = {}
        for g in groups:
            for t in g.tensors:
                if t in seen:
                    raise SchemaError(f"sensitivity table: tensor {t} is in groups {seen[t]} and {g.name}")
                seen[t] = g.name
        if len({g.name for g in groups}) != len(groups):
            raise SchemaError("sensitivity table: two groups have the same name")
        fixed = d.get("fixed") or {}
        if not isinstance(fixed, dict) or not all(isinstance(v, str) for v in fixed.values()):
            raise SchemaError("sensitivity table: \"fixed\" must map tensor names to type names")
        if d.get("format", SENSITIVITY_FORMAT) != SENSITIVITY_FORMAT or not isinstance(d.get("base") or {}, dict):
            raise SchemaError(f"sensitivity table: not a {SENSITIVITY_FORMAT} table (format or base); rerun "
                              "`moepack sensitivity`")
        overhead = d.get("overhead_bytes")
        return cls(groups, _num(d.get("fixed_bytes", 0), "fixed_bytes", True), dict(d.get("base") or {}),
                   dict(fixed), None if overhead is None else _num(overhead, "overhead_bytes", True),
                   d.get("format"), d.get("proxy"), d.get("timing"))

    @classmethod
    def read(cls, path: str | Path) -> SensitivityTable:
        try:
            return cls.from_dict(read_json(Path(path), "sensitivity table"))
        except SchemaError as e:
            raise SchemaError(str(e) if str(path) in str(e) else f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": 1}
        if self.format is not None:
            d["format"] = self.format
        d.update(base=self.base, fixed_bytes=self.fixed_bytes)
        if self.fixed:
            d["fixed"] = self.fixed
        d["groups"] = [g.to_dict() for g in self.groups]
        d.update({k: v for k, v in (("overhead_bytes", self.overhead_bytes), ("proxy", self.proxy),
                                    ("timing", self.timing)) if v is not None})
        return d

    def write(self, path: str | Path) -> Path:
        return save_json(self.to_dict(), path, indent=1)


def _plan_types(tensors: Any, where: Path | str) -> dict[str, str]:
    """GGUF tensor name → GGML type name from a plan's "tensors": each entry a type name or an object with a "type"
    (the names are checked where the types are used: moepack.gguf.types.parse_type)."""
    if not isinstance(tensors, dict) or not tensors:
        raise SchemaError(f"{where}: a quant plan needs a non-empty \"tensors\" object (GGUF tensor name → type)")
    types: dict[str, str] = {}
    for name, v in tensors.items():
        t = v.get("type") if isinstance(v, dict) else v
        if not isinstance(t, str) or not t:
            raise SchemaError(f"{where}: tensor {name!r} has no type name")
        types[name] = t
    return types


@dataclass(frozen=True)
class QuantPlan:
    """quant_plan.json: one GGML type per GGUF tensor. allocate's plans (version 1, every field below) also say how
    the types were chosen within `budget_bytes`; a plan written by hand needs only "tensors" (QuantPlan.by_hand)."""

    solver: str
    budget_bytes: int
    predicted_bytes: int
    fixed_bytes: int
    predicted_dkld: float
    groups: dict[str, str]
    tensors: dict[str, str]
    bucket_bytes: int | None = None
    predicted_kld: float | None = None
    base: dict[str, Any] = field(default_factory=dict)
    # A plan allocate did not make: its fields besides "tensors", as given (None: allocate's plan).
    given: dict[str, Any] | None = field(default=None, compare=False)

    @classmethod
    def by_hand(cls, tensors: dict[str, str], given: dict[str, Any] | None = None) -> QuantPlan:
        """A plan that is only its types (written by hand, or built in code); `given`: its other fields, kept as
        they are. Its allocation fields are empty: nothing was predicted."""
        return cls("", 0, 0, 0, 0.0, {}, dict(tensors), given=dict(given or {}))

    @property
    def allocated(self) -> bool:
        """Whether allocate made the plan (its budget and predictions mean something)."""
        return self.given is None

    @property
    def source(self) -> dict[str, Any]:
        """How the plan was made, as the GGUF's moepack.quant_plan records it beside the types written: every field
        but the tensors."""
        return {k: v for k, v in self.to_dict().items() if k != "tensors"}

    def to_dict(self) -> dict[str, Any]:
        if self.given is not None:
            return {**self.given, "tensors": self.tensors}
        return {"version": 1, "solver": self.solver, "budget_bytes": self.budget_bytes,
                "predicted_bytes": self.predicted_bytes, "fixed_bytes": self.fixed_bytes,
                "bucket_bytes": self.bucket_bytes, "predicted_dkld": self.predicted_dkld,
                "predicted_kld": self.predicted_kld, "groups": self.groups, "tensors": self.tensors,
                "base": self.base}

    @classmethod
    def from_dict(cls, d: Any, where: Path | str = "quant plan") -> QuantPlan:
        """allocate's plan (version 1 with every field), else a plan written by hand (see `by_hand`)."""
        if not isinstance(d, dict):
            raise SchemaError(f"{where}: a quant plan is a JSON object with a \"tensors\" object (GGUF tensor name "
                              "→ type)")
        if d.get("version", 1) != 1:
            raise SchemaError(f"{where}: quant plan version {d.get('version')!r} is not supported (this moepack "
                              "reads version 1); rerun moepack allocate")
        tensors = _plan_types(d.get("tensors"), where)
        allocated = [f.name for f in fields(cls) if f.name not in ("tensors", "given")]
        if "version" in d and all(k in d for k in allocated):
            return cls(**{k: d[k] for k in allocated}, tensors=tensors)
        return cls.by_hand(tensors, {k: v for k, v in d.items() if k != "tensors"})

    @classmethod
    def read(cls, path: str | Path) -> QuantPlan:
        return cls.from_dict(read_json(Path(path), "quant plan"), path)

    def write(self, path: str | Path) -> Path:
        return save_json(self.to_dict(), path)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t] = counts.get(t, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
