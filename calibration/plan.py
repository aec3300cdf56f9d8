"""DiTFastAttnV2 plan model and its JSON file format (v1): which method each head of each layer uses
at each position of the noise schedule.

Plan files are plain JSON, validated field by field on load; nothing in a plan is ever executed. A loaded
plan keeps each position's layers as the file's code strings (`DecisionRow`) and decodes a layer decision on
first use, so a cap-sized file loads in a fraction of a second. Format reference and the run-mapping rule:
README.md, section "Plan files".
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import stat
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

from ..kernels.methods import FULL, HeadMethod, LayerDecision, MethodKind

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_PLAN_BYTES",
    "PlanError",
    "LayerSpec",
    "ModelSignature",
    "CalibrationRecord",
    "SETTINGS_FIELDS",
    "settings_differences",
    "describe_settings",
    "PlanPosition",
    "DecisionRow",
    "Plan",
    "sanitize_text",
    "read_plan_bytes",
    "load_plan",
    "loads_plan",
    "save_plan",
    "dumps_plan",
]

FORMAT_NAME = "dfav2-plan"
FORMAT_VERSION = 1
MAX_PLAN_BYTES = 16 * 1024 * 1024
Family = Literal["flux", "flux2", "sd3"]
FAMILIES: tuple[str, ...] = ("flux", "flux2", "sd3")

_MAX_LAYERS = 1024
_MAX_HEADS = 1024
_MAX_HEAD_DIM = 1024
_MAX_POSITIONS = 10_000
_MAX_STR = 256
_MAX_INT = 1 << 31
# Codes used when writing a plan; a file may use any single printable character listed in its legend.
# FP8 variants: capitals next to their plain codes where free (arrow/8+fp8 "A", /16 "B"; "C" is cache, so /32 "E"),
# "Q" (quantized) for full+fp8.
_PREFERRED_CODES = {
    "full": "F", "cache": "C", "arrow/8": "a", "arrow/16": "b", "arrow/32": "c",
    "full+fp8": "Q", "arrow/8+fp8": "A", "arrow/16+fp8": "B", "arrow/32+fp8": "E",
}
_SPARE_CODES = "defghijklmnopqrstuvwxyzDEGHIJKLMNOPQRSTUVWXYZ0123456789"


class PlanError(ValueError):
    """A plan file or plan object is invalid; the message names the field and the offending value."""


# Lone surrogates (unencodable: a summary holding one cannot be printed or sent) and control characters other
# than tab and newline (terminal escapes in logs) become U+FFFD.
_UNSAFE_TEXT = re.compile("[\ud800-\udfff\x00-\x08\x0b-\x1f\x7f-\x9f]")


def sanitize_text(text: str) -> str:
    """`text` with lone surrogates and control characters (except tab and newline) replaced by U+FFFD."""
    return _UNSAFE_TEXT.sub("\ufffd", text)


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
    """How a plan was made: warnings when a run differs (DFAApply), recognising a re-run (DFACalibrate)."""

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
    #: Cheap fingerprint of the weights calibrated on (a few sampled values); None: not recorded. Applying the
    #: plan to other weights of the same architecture (another finetune) warns once.
    weights: str | None = None
    #: Fingerprint of the calibration conditioning (prompt encodings; the negative too when cfg != 1); None: not
    #: recorded. Lets DFACalibrate recognise a re-run with the same prompts.
    conditioning: str | None = None
    #: The cost of an FP8 score pair relative to a bf16 pair that the search weighed FP8 candidates with
    #: (`kernels.cost.FP8_COST_FACTOR` at the time); None: no FP8 candidates.
    fp8_cost_factor: float | None = None

    def settings(self) -> dict[str, Any]:
        """The fields that define "the same calibration" (`SETTINGS_FIELDS`), by name."""
        return {k: getattr(self, k) for k in SETTINGS_FIELDS}

    def describe(self) -> str:
        """One line with every field, for error messages that show a whole record."""
        return describe_settings(asdict(self))


#: Record fields that define a calibration: the same model signature plus equal values of these give the same plan
#: (the search is deterministic). The rest (txt_len follows from the conditioning; host/pack version, date, wall time)
#: is provenance.
SETTINGS_FIELDS: tuple[str, ...] = (
    "delta", "candidates", "prompts", "steps", "sampler", "scheduler", "cfg", "guidance", "width", "height", "seed",
    "weights", "conditioning", "fp8_cost_factor",
)
_OPTIONAL_RECORD_FIELDS = ("weights", "conditioning", "fp8_cost_factor")  # written only when recorded


def _show_setting(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "/".join(map(str, value))
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def describe_settings(values: dict[str, Any]) -> str:
    """`field value, ...` for record fields (a whole record, or the settings of a requested calibration)."""
    return ", ".join(f"{k} {_show_setting(v)}" for k, v in values.items())


def _same_setting(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, float) or isinstance(b, float):  # widget floats and JSON floats: equal up to rounding
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return tuple(a) == tuple(b)
    return bool(a == b)


def settings_differences(recorded: CalibrationRecord, requested: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(field, recorded, requested) for each `SETTINGS_FIELDS` entry where a plan's record and a requested
    calibration differ, values shown as text; empty when calibrating again would reproduce the plan. `requested`
    needs every settings field. None equals only None (a field an older file did not record is a difference;
    guidance None is SD3's "no guidance")."""
    missing = [k for k in SETTINGS_FIELDS if k not in requested]
    if missing:
        raise KeyError(f"requested settings lack {', '.join(missing)}")
    mine = recorded.settings()
    return [(k, _show_setting(mine[k]), _show_setting(requested[k])) for k in SETTINGS_FIELDS
            if not _same_setting(mine[k], requested[k])]


class DecisionRow(Sequence[LayerDecision]):
    """One position's layer decisions as a plan file stores them (one legend-code string per layer), decoded
    into `LayerDecision`s on first use and interned per plan (the hot path touches few of them)."""

    __slots__ = ("codes", "_legend", "_memo")

    def __init__(self, codes: tuple[str, ...], legend: dict[str, HeadMethod], memo: dict[str, LayerDecision]) -> None:
        self.codes = codes
        self._legend = legend
        self._memo = memo  # shared by the rows of one plan

    def _decode(self, codes: str) -> LayerDecision:
        dec = self._memo.get(codes)
        if dec is None:
            legend = self._legend
            dec = self._memo[codes] = LayerDecision(tuple(legend[c] for c in codes))
        return dec

    def __len__(self) -> int:
        return len(self.codes)

    @overload
    def __getitem__(self, index: int) -> LayerDecision: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[LayerDecision, ...]: ...
    def __getitem__(self, index: int | slice) -> LayerDecision | tuple[LayerDecision, ...]:
        if isinstance(index, slice):
            return tuple(self._decode(c) for c in self.codes[index])
        return self._decode(self.codes[index])

    def __iter__(self) -> Iterator[LayerDecision]:
        return (self._decode(c) for c in self.codes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"DecisionRow({list(self.codes)!r})"


@dataclass(frozen=True)
class PlanPosition:
    """Decisions at one schedule position: the sigma of the calibration forward, one decision per layer
    (a tuple, or a `DecisionRow` for plans read from a file)."""

    sigma: float
    layers: Sequence[LayerDecision]


@dataclass(frozen=True)
class Plan:
    """An immutable, validated plan. Positions are sorted by strictly decreasing sigma."""

    model: ModelSignature
    positions: tuple[PlanPosition, ...]
    calibration: CalibrationRecord | None = None
    description: str = ""
    _keep: dict[tuple[int, int], tuple[int, ...]] = field(init=False, repr=False, compare=False)
    _neg_sigmas: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _counts: list[Counter[HeadMethod]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "description", sanitize_text(self.description))
        _check_plan(self)
        object.__setattr__(self, "_keep", {})  # filled lazily by keep_heads
        object.__setattr__(self, "_counts", [])  # filled lazily by layer_method_counts
        object.__setattr__(self, "_neg_sigmas", tuple(-p.sigma for p in self.positions))

    # -- queries used on the hot path -------------------------------------------------------------
    def decision(self, position: int, layer: int) -> LayerDecision:
        return self.positions[position].layers[layer]

    def keep_heads(self, position: int, layer: int) -> tuple[int, ...]:
        """Heads whose output must survive a forward at `position`: those cached at it (a repeated evaluation at
        the same sigma) or at the next position (the next step). Missing heads are recomputed."""
        key = (position, layer)
        keep = self._keep.get(key)
        if keep is None:
            heads = set(self.decision(position, layer).cache_heads)
            if position + 1 < len(self.positions):
                heads.update(self.decision(position + 1, layer).cache_heads)
            keep = self._keep[key] = tuple(sorted(heads))
        return keep

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

    def layer_method_counts(self) -> list[Counter[HeadMethod]]:
        """Per layer: how many (position, head) entries use each method. File-backed rows are counted on their
        code strings, one join per layer, without decoding (a cap-sized plan's summary stays fast). Computed once
        per plan; callers get copies."""
        if not self._counts:
            self._counts.extend(self._count_methods())
        return [Counter(c) for c in self._counts]

    def _count_methods(self) -> list[Counter[HeadMethod]]:
        counts: list[Counter[HeadMethod]] = [Counter() for _ in self.model.layers]
        by_legend: dict[int, list[DecisionRow]] = {}
        for pos in self.positions:
            row = pos.layers
            if isinstance(row, DecisionRow):
                by_legend.setdefault(id(row._legend), []).append(row)
            else:
                for c, dec in zip(counts, row):
                    c.update(dec.methods)
        for rows in by_legend.values():
            legend = rows[0]._legend
            for li, c in enumerate(counts):
                joined = "".join([r.codes[li] for r in rows])
                for code, method in legend.items():
                    n = joined.count(code)
                    if n:
                        c[method] += n
        return counts

    def method_counts(self) -> Counter[str]:
        """How many (position, layer, head) entries use each method name."""
        counts: Counter[str] = Counter()
        for c in self.layer_method_counts():
            for m, n in c.items():
                counts[m.name] += n
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
    heads = [spec.heads for spec in plan.model.layers]
    prev = math.inf
    for p, pos in enumerate(plan.positions):
        if not (math.isfinite(pos.sigma) and pos.sigma >= 0):
            raise PlanError(f"plan.positions[{p}].sigma: must be a finite number >= 0, got {pos.sigma!r}")
        if not pos.sigma < prev:
            raise PlanError(f"plan.positions[{p}].sigma: sigmas must strictly decrease, got {pos.sigma!r} after {prev!r}")
        prev = pos.sigma
        if len(pos.layers) != n_layers:
            raise PlanError(f"plan.positions[{p}].layers: expected {n_layers} layers, got {len(pos.layers)}")
        row = pos.layers
        if isinstance(row, DecisionRow) and list(map(len, row.codes)) == heads and (p > 0 or not any(
            m.kind is MethodKind.CACHE and any(c in s for s in row.codes) for c, m in row._legend.items()
        )):
            continue  # checked on the code strings, without decoding
        for li, (dec, spec) in enumerate(zip(row, plan.model.layers)):
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
            k: v for k, v in {**asdict(plan.calibration), "candidates": list(plan.calibration.candidates)}.items()
            if not (k in _OPTIONAL_RECORD_FIELDS and v is None)
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


def read_plan_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a plan file: a regular file of at most MAX_PLAN_BYTES, else PlanError (OSError if it cannot
    be opened). Opened non-blocking and checked on the open descriptor, so a named pipe or device called
    ``x.json`` is refused instead of blocking the caller forever."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PlanError(f"{path.name}: not a regular file")
        if st.st_size > MAX_PLAN_BYTES:
            raise PlanError(f"{path.name}: file is {st.st_size} bytes, larger than the {MAX_PLAN_BYTES} byte limit for plans")
        return f.read(MAX_PLAN_BYTES + 1)


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and validate a plan file. Raises PlanError (or FileNotFoundError) with a one-line reason."""
    return loads_plan(read_plan_bytes(path))


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
        raw = json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys)
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


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON leaves duplicate keys undefined and Python keeps the last one silently ("version": 99, ..., "version": 1).
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {json.dumps(dup)[:60]}")
    return out


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
    return sanitize_text(x)


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
        # A name this pack cannot read is most likely a method added after it (full+fp8 was one): say so.
        raise PlanError(f"{path}: {exc}. If the plan was written by a newer version of DiTFastAttnV2, update this "
                        "pack to use it") from None


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
    memo: dict[str, LayerDecision] = {}
    heads = [l.heads for l in layers]
    strip = {ord(c): None for c in legend}
    for pi, pos in enumerate(_list(top["positions"], "plan.positions", _MAX_POSITIONS)):
        pp = f"plan.positions[{pi}]"
        po = _obj(pos, pp, {"sigma", "layers"})
        sigma = _num(po["sigma"], pp + ".sigma", 0.0, 1e6)
        row = _list(po["layers"], pp + ".layers", _MAX_LAYERS)
        # Fast check of a well-formed row in C (types, one code per head, only legend codes); anything else
        # takes the field-by-field path below, which names the first bad value.
        if not (all(type(c) is str for c in row) and list(map(len, row)) == heads and not "".join(row).translate(strip)):
            for li, codes in enumerate(row):
                lp = f"{pp}.layers[{li}]"
                codes = _str(codes, lp, _MAX_HEADS)
                bad = next((c for c in codes if c not in legend), None)
                if bad is not None:
                    raise PlanError(f"{lp}: code {bad!r} is not in plan.legend")
                if not codes:
                    raise PlanError(f"{lp}: empty decision string")
        positions.append(PlanPosition(sigma, DecisionRow(tuple(row), legend, memo)))
    return Plan(model, tuple(positions), calibration, description)


def _calibration(c: Any) -> CalibrationRecord:
    p = "plan.calibration"
    fields = {
        "delta", "candidates", "prompts", "steps", "sampler", "scheduler", "cfg", "guidance", "width", "height",
        "txt_len", "seed", "host_version", "pack_version", "date", "wall_time_s",
    }
    c = _obj(c, p, fields, set(_OPTIONAL_RECORD_FIELDS))
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
        weights=None if c.get("weights") is None else _str(c["weights"], p + ".weights", 128),
        conditioning=None if c.get("conditioning") is None else _str(c["conditioning"], p + ".conditioning", 128),
        fp8_cost_factor=None if c.get("fp8_cost_factor") is None else _num(
            c["fp8_cost_factor"], p + ".fp8_cost_factor", 1e-3, 1e3),
    )

