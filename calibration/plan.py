"""DiTFastAttnV2 plan model and its JSON file format (v1): which method each head of each layer uses
at each position of the noise schedule.

Plan files are plain JSON, validated field by field on load; nothing in a plan is ever executed.
Format reference and the run-mapping rule: README.md, section "Plan files".
"""

from __future__ import annotations

import bisect
import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..kernels.methods import FULL, HeadMethod, LayerDecision

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_PLAN_BYTES",
    "PlanError",
    "LayerSpec",
    "ModelSignature",
    "CalibrationRecord",
    "PlanPosition",
    "Plan",
    "load_plan",
    "loads_plan",
    "save_plan",
    "dumps_plan",
]

FORMAT_NAME = "dfav2-plan"
FORMAT_VERSION = 1
MAX_PLAN_BYTES = 16 * 1024 * 1024
Family = Literal["flux", "sd3"]
FAMILIES: tuple[str, ...] = ("flux", "sd3")

_MAX_LAYERS = 1024
_MAX_HEADS = 1024
_MAX_HEAD_DIM = 1024
_MAX_POSITIONS = 10_000
_MAX_STR = 256
_MAX_INT = 1 << 31
# Codes used when writing a plan; a file may use any single printable character listed in its legend.
_PREFERRED_CODES = {"full": "F", "cache": "C", "arrow/8": "a", "arrow/16": "b", "arrow/32": "c"}
_SPARE_CODES = "defghijklmnopqrstuvwxyzDEGHIJKLMNOPQRSTUVWXYZ0123456789"


class PlanError(ValueError):
    """A plan file or plan object is invalid; the message names the field and the offending value."""


# ----------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class LayerSpec:
    """One attention layer of the model, in forward order.

    name: ``double.<i>`` / ``single.<i>`` (Flux), ``joint.<i>`` / ``joint.<i>.attn2`` (SD3; attn2 is
    SD3.5-Medium's image-only self-attention, T = 0 there).
    """

    name: str
    heads: int
    head_dim: int
    image_only: bool = False


@dataclass(frozen=True)
class ModelSignature:
    """What a plan fits: the family and the ordered attention layers with heads and head_dim."""

    family: Family
    layers: tuple[LayerSpec, ...]

    def describe(self) -> str:
        heads = Counter((l.heads, l.head_dim) for l in self.layers)
        shapes = ", ".join(f"{h} heads × {d}" for (h, d), _ in heads.most_common())
        return f"{self.family} ({len(self.layers)} attention layers, {shapes})"

    def mismatch(self, other: ModelSignature) -> str | None:
        """None if `other` (the running model) matches, else a sentence saying what differs."""
        if self.family != other.family:
            return f"plan is for {self.family} but the model is {other.family}"
        if len(self.layers) != len(other.layers):
            return f"plan has {len(self.layers)} attention layers but the model has {len(other.layers)}"
        for mine, theirs in zip(self.layers, other.layers):
            if mine != theirs:
                return (
                    f"layer {mine.name}: plan has {mine.heads} heads × {mine.head_dim}"
                    f"{' (image-only)' if mine.image_only else ''}, model has {theirs.name} with "
                    f"{theirs.heads} heads × {theirs.head_dim}{' (image-only)' if theirs.image_only else ''}"
                )
        return None


@dataclass(frozen=True)
class CalibrationRecord:
    """How a plan was made (informational; used for warnings when a run differs)."""

    delta: float
    candidates: tuple[str, ...]
    prompts: int
    steps: int
    sampler: str
    scheduler: str
    cfg: float
    guidance: float | None
    width: int
    height: int
    txt_len: int
    seed: int
    host_version: str
    pack_version: str
    date: str
    wall_time_s: float


@dataclass(frozen=True)
class PlanPosition:
    """Decisions at one schedule position: the sigma of the calibration forward, one decision per layer."""

    sigma: float
    layers: tuple[LayerDecision, ...]


@dataclass(frozen=True)
class Plan:
    """An immutable, validated plan. Positions are sorted by strictly decreasing sigma."""

    model: ModelSignature
    positions: tuple[PlanPosition, ...]
    calibration: CalibrationRecord | None = None
    description: str = ""
    _keep: tuple[tuple[tuple[int, ...], ...], ...] = field(init=False, repr=False, compare=False)
    _neg_sigmas: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_plan(self)
        # Heads whose output must survive a forward at position p: those cached at p (a repeated
        # evaluation at the same sigma) or at p + 1 (the next step). Missing heads are recomputed.
        keep = []
        for p, pos in enumerate(self.positions):
            nxt = self.positions[p + 1] if p + 1 < len(self.positions) else None
            row = []
            for li, dec in enumerate(pos.layers):
                heads = set(dec.cache_heads)
                if nxt is not None:
                    heads.update(nxt.layers[li].cache_heads)
                row.append(tuple(sorted(heads)))
            keep.append(tuple(row))
        object.__setattr__(self, "_keep", tuple(keep))
        object.__setattr__(self, "_neg_sigmas", tuple(-p.sigma for p in self.positions))

    # -- queries used on the hot path -------------------------------------------------------------
    def decision(self, position: int, layer: int) -> LayerDecision:
        return self.positions[position].layers[layer]

    def keep_heads(self, position: int, layer: int) -> tuple[int, ...]:
        return self._keep[position][layer]

    def position_for_sigma(self, sigma: float) -> int:
        """Index of the plan position whose calibration sigma is nearest to `sigma` (ties: earlier)."""
        i = bisect.bisect_left(self._neg_sigmas, -sigma)
        if i == 0:
            return 0
        if i == len(self._neg_sigmas):
            return i - 1
        before, after = self.positions[i - 1].sigma, self.positions[i].sigma
        return i - 1 if before - sigma <= sigma - after else i

    @property
    def sigmas(self) -> tuple[float, ...]:
        return tuple(p.sigma for p in self.positions)

    def method_counts(self) -> Counter[str]:
        """How many (position, layer, head) entries use each method name."""
        counts: Counter[str] = Counter()
        for pos in self.positions:
            for dec in pos.layers:
                counts.update(m.name for m in dec.methods)
        return counts

    # -- constructors --------------------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        model: ModelSignature,
        sigmas: list[float] | tuple[float, ...],
        method: HeadMethod,
        *,
        first_full: bool = True,
        description: str = "",
    ) -> Plan:
        """Every head of every layer uses `method`; with `first_full` the first position is all full."""
        positions = []
        for i, s in enumerate(sigmas):
            m = FULL if (first_full and i == 0) else method
            positions.append(PlanPosition(float(s), tuple(LayerDecision.uniform(m, l.heads) for l in model.layers)))
        return cls(model, tuple(positions), None, description)


def _check_plan(plan: Plan) -> None:
    if not plan.positions:
        raise PlanError("plan.positions: a plan needs at least one position")
    n_layers = len(plan.model.layers)
    prev = math.inf
    for p, pos in enumerate(plan.positions):
        if not (math.isfinite(pos.sigma) and pos.sigma >= 0):
            raise PlanError(f"plan.positions[{p}].sigma: must be a finite number >= 0, got {pos.sigma!r}")
        if not pos.sigma < prev:
            raise PlanError(f"plan.positions[{p}].sigma: sigmas must strictly decrease, got {pos.sigma!r} after {prev!r}")
        prev = pos.sigma
        if len(pos.layers) != n_layers:
            raise PlanError(f"plan.positions[{p}].layers: expected {n_layers} layers, got {len(pos.layers)}")
        for li, (dec, spec) in enumerate(zip(pos.layers, plan.model.layers)):
            if dec.heads != spec.heads:
                raise PlanError(
                    f"plan.positions[{p}].layers[{li}] ({spec.name}): expected {spec.heads} heads, got {dec.heads}"
                )
            if p == 0 and dec.cache_heads:
                raise PlanError(f"plan.positions[0].layers[{li}] ({spec.name}): the first position cannot use 'cache'")


# ----------------------------------------------------------------------------------------------- JSON


def _legend_for(plan: Plan) -> dict[str, str]:
    names = sorted({m.name for pos in plan.positions for dec in pos.layers for m in dec.methods})
    legend: dict[str, str] = {}
    spare = iter(c for c in _SPARE_CODES if c not in _PREFERRED_CODES.values())
    for name in names:
        legend[_PREFERRED_CODES.get(name) or next(spare)] = name
    return legend


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The JSON-ready dict of a plan (format v1)."""
    legend = _legend_for(plan)
    code = {name: c for c, name in legend.items()}
    out: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "description": plan.description,
        "model": {
            "family": plan.model.family,
            "layers": [asdict(l) for l in plan.model.layers],
        },
        "calibration": None if plan.calibration is None else {
            **asdict(plan.calibration), "candidates": list(plan.calibration.candidates)
        },
        "legend": legend,
        "positions": [
            {"sigma": pos.sigma, "layers": ["".join(code[m.name] for m in dec.methods) for dec in pos.layers]}
            for pos in plan.positions
        ],
    }
    return out


def dumps_plan(plan: Plan) -> str:
    """Plan as JSON text: one line per layer and per position so diffs stay readable."""
    d = plan_to_dict(plan)

    def line(x: Any) -> str:
        return json.dumps(x, separators=(", ", ": "), allow_nan=False)

    def rows(items: list[Any]) -> str:
        return "[\n" + ",\n".join("   " + line(i) for i in items) + "\n ]"

    parts = [f' "{k}": {line(d[k])}' for k in ("format", "version", "description")]
    parts.append(f' "model": {{"family": {line(d["model"]["family"])}, "layers": {rows(d["model"]["layers"])}}}')
    parts += [f' "{k}": {line(d[k])}' for k in ("calibration", "legend")]
    parts.append(f' "positions": {rows(d["positions"])}')
    return "{\n" + ",\n".join(parts) + "\n}\n"


def save_plan(plan: Plan, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write atomically (temp file in the same folder + rename). Refuses to replace a file unless `overwrite`."""
    path = Path(path)
    text = dumps_plan(plan)
    loads_plan(text)  # never write what we could not read back
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"plan file {path} already exists; choose another name or allow overwriting")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if someone created `path` meanwhile
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and validate a plan file. Raises PlanError (or FileNotFoundError) with a one-line reason."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_PLAN_BYTES:
        raise PlanError(f"{path.name}: file is {size} bytes, larger than the {MAX_PLAN_BYTES} byte limit for plans")
    with open(path, "rb") as f:
        data = f.read(MAX_PLAN_BYTES + 1)
    return loads_plan(data)


def loads_plan(data: str | bytes) -> Plan:
    """Parse and validate plan JSON (text or UTF-8 bytes)."""
    if len(data) > MAX_PLAN_BYTES:
        raise PlanError(f"plan is {len(data)} bytes, larger than the {MAX_PLAN_BYTES} byte limit")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PlanError(f"plan is not UTF-8 text (byte {exc.start})") from None
    try:
        raw = json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise PlanError(f"plan is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise PlanError("plan JSON is nested too deeply") from None
    except ValueError as exc:  # from _reject_constant, or int too long
        raise PlanError(f"plan is not valid JSON: {exc}") from None
    return plan_from_dict(raw)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a plan")


# -- field validation ---------------------------------------------------------------------------------


def _type_name(x: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(x), type(x).__name__)


def _show(x: Any) -> str:
    r = json.dumps(x) if isinstance(x, (str, int, float, bool, type(None))) else _type_name(x)
    return r if len(r) <= 60 else r[:57] + "..."


def _obj(x: Any, path: str, required: set[str], optional: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise PlanError(f"{path}: expected an object, got {_type_name(x)}")
    missing = sorted(required - x.keys())
    if missing:
        raise PlanError(f"{path}.{missing[0]}: required field is missing")
    unknown = sorted(x.keys() - required - optional)
    if unknown:
        raise PlanError(f"{path}.{unknown[0]}: unknown field")
    return x


def _str(x: Any, path: str, max_len: int = _MAX_STR) -> str:
    if not isinstance(x, str):
        raise PlanError(f"{path}: expected a string, got {_show(x)}")
    if len(x) > max_len:
        raise PlanError(f"{path}: string longer than {max_len} characters")
    return x


def _int(x: Any, path: str, lo: int, hi: int = _MAX_INT) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise PlanError(f"{path}: expected an integer, got {_show(x)}")
    if not lo <= x <= hi:
        raise PlanError(f"{path}: must be in [{lo}, {hi}], got {_show(x)}")
    return x


def _num(x: Any, path: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise PlanError(f"{path}: expected a number, got {_show(x)}")
    try:
        v = float(x)
    except OverflowError:
        raise PlanError(f"{path}: number out of range") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise PlanError(f"{path}: must be a finite number in [{lo}, {hi}], got {_show(x)}")
    return v


def _list(x: Any, path: str, max_len: int) -> list[Any]:
    if not isinstance(x, list):
        raise PlanError(f"{path}: expected an array, got {_type_name(x)}")
    if len(x) > max_len:
        raise PlanError(f"{path}: more than {max_len} entries")
    return x


def _method(name: Any, path: str) -> HeadMethod:
    try:
        return HeadMethod.parse(_str(name, path))
    except ValueError as exc:
        raise PlanError(f"{path}: {exc}") from None


def plan_from_dict(raw: Any) -> Plan:
    """Validate a decoded JSON value and build the Plan; PlanError names the first bad field."""
    top = _obj(raw, "plan", {"format", "version", "model", "legend", "positions"}, {"calibration", "description"})
    if top["format"] != FORMAT_NAME:
        raise PlanError(f"plan.format: expected {FORMAT_NAME!r}, got {_show(top['format'])}")
    version = _int(top["version"], "plan.version", 1, _MAX_INT)
    if version != FORMAT_VERSION:
        raise PlanError(f"plan.version: this pack reads version {FORMAT_VERSION}, got {version}; update the pack")
    description = _str(top.get("description", ""), "plan.description", 4096)

    m = _obj(top["model"], "plan.model", {"family", "layers"})
    family = _str(m["family"], "plan.model.family")
    if family not in FAMILIES:
        raise PlanError(f"plan.model.family: expected one of {', '.join(FAMILIES)}, got {_show(family)}")
    layers = []
    names: set[str] = set()
    for i, l in enumerate(_list(m["layers"], "plan.model.layers", _MAX_LAYERS)):
        p = f"plan.model.layers[{i}]"
        lo = _obj(l, p, {"name", "heads", "head_dim"}, {"image_only"})
        name = _str(lo["name"], p + ".name", 64)
        if name in names:
            raise PlanError(f"{p}.name: duplicate layer name {name!r}")
        names.add(name)
        image_only = lo.get("image_only", False)
        if not isinstance(image_only, bool):
            raise PlanError(f"{p}.image_only: expected true or false, got {_show(image_only)}")
        layers.append(LayerSpec(name, _int(lo["heads"], p + ".heads", 1, _MAX_HEADS), _int(lo["head_dim"], p + ".head_dim", 1, _MAX_HEAD_DIM), image_only))
    if not layers:
        raise PlanError("plan.model.layers: a plan needs at least one layer")
    model = ModelSignature(family, tuple(layers))  # type: ignore[arg-type]

    calibration = None
    if top.get("calibration") is not None:
        calibration = _calibration(top["calibration"])

    legend_raw = top["legend"]
    if not isinstance(legend_raw, dict):
        raise PlanError(f"plan.legend: expected an object, got {_type_name(legend_raw)}")
    if len(legend_raw) > 64:
        raise PlanError("plan.legend: more than 64 codes")
    legend: dict[str, HeadMethod] = {}
    for code, name in legend_raw.items():
        if len(code) != 1 or not code.isprintable() or code.isspace():
            raise PlanError(f"plan.legend: code {code!r} must be one printable, non-space character")
        legend[code] = _method(name, f"plan.legend.{code}")
    if len(set(legend.values())) != len(legend):
        raise PlanError("plan.legend: two codes name the same method")

    positions = []
    interned: dict[str, LayerDecision] = {}
    for pi, pos in enumerate(_list(top["positions"], "plan.positions", _MAX_POSITIONS)):
        pp = f"plan.positions[{pi}]"
        po = _obj(pos, pp, {"sigma", "layers"})
        sigma = _num(po["sigma"], pp + ".sigma", 0.0, 1e6)
        decs = []
        for li, codes in enumerate(_list(po["layers"], pp + ".layers", _MAX_LAYERS)):
            lp = f"{pp}.layers[{li}]"
            codes = _str(codes, lp, _MAX_HEADS)
            dec = interned.get(codes)
            if dec is None:
                bad = next((c for c in codes if c not in legend), None)
                if bad is not None:
                    raise PlanError(f"{lp}: code {bad!r} is not in plan.legend")
                if not codes:
                    raise PlanError(f"{lp}: empty decision string")
                dec = interned[codes] = LayerDecision(tuple(legend[c] for c in codes))
            decs.append(dec)
        positions.append(PlanPosition(sigma, tuple(decs)))
    return Plan(model, tuple(positions), calibration, description)


def _calibration(c: Any) -> CalibrationRecord:
    p = "plan.calibration"
    fields = {
        "delta", "candidates", "prompts", "steps", "sampler", "scheduler", "cfg", "guidance", "width", "height",
        "txt_len", "seed", "host_version", "pack_version", "date", "wall_time_s",
    }
    c = _obj(c, p, fields)
    candidates = tuple(_method(n, f"{p}.candidates[{i}]").name for i, n in enumerate(_list(c["candidates"], p + ".candidates", 64)))
    return CalibrationRecord(
        delta=_num(c["delta"], p + ".delta", 0.0, 1e6),
        candidates=candidates,
        prompts=_int(c["prompts"], p + ".prompts", 1, 1_000_000),
        steps=_int(c["steps"], p + ".steps", 1, 100_000),
        sampler=_str(c["sampler"], p + ".sampler"),
        scheduler=_str(c["scheduler"], p + ".scheduler"),
        cfg=_num(c["cfg"], p + ".cfg", -1e6, 1e6),
        guidance=None if c["guidance"] is None else _num(c["guidance"], p + ".guidance", -1e6, 1e6),
        width=_int(c["width"], p + ".width", 1, 1 << 20),
        height=_int(c["height"], p + ".height", 1, 1 << 20),
        txt_len=_int(c["txt_len"], p + ".txt_len", 0, 1 << 20),
        seed=_int(c["seed"], p + ".seed", 0, (1 << 64) - 1),
        host_version=_str(c["host_version"], p + ".host_version"),
        pack_version=_str(c["pack_version"], p + ".pack_version"),
        date=_str(c["date"], p + ".date"),
        wall_time_s=_num(c["wall_time_s"], p + ".wall_time_s", 0.0, 1e9),
    )

