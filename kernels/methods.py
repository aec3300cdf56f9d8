"""The per-head vocabulary of DiTFastAttnV2: a head's method (full, arrow/f, cache, and the FP8 variants full+fp8,
arrow/f+fp8) and its window.

A head's method is a small frozen value (`HeadMethod`); a layer's decision at one schedule position is a
`LayerDecision` (one method per head) that precomputes the head groups the engine and kernels need. At a
given image size a method becomes a *window*, the one integer encoding that the masks, the cost model, the
engine and the Triton kernel's per-head table all use: `WINDOW_FULL`, `WINDOW_SKIP` or a band half-width.
Quantization is independent of the window: a second per-head int32 table (`LayerDecision.quant`, `QUANT_NONE` /
`QUANT_FP8`) says which heads compute in FP8 (kernels/quant.py defines the scheme).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

__all__ = [
    "MethodKind",
    "Quant",
    "HeadMethod",
    "LayerDecision",
    "FULL",
    "CACHE",
    "FULL_FP8",
    "arrow",
    "MAX_ARROW_FACTOR",
    "WINDOW_FULL",
    "WINDOW_SKIP",
    "QUANT_NONE",
    "QUANT_FP8",
]

#: Window of a full head: every (q, k) pair is computed.
WINDOW_FULL = -1
#: Window of a head that is not computed here (a cached head: its output is pasted from the head cache).
WINDOW_SKIP = -2
#: Quant-table entry of a head computed in the inputs' dtype (bf16 / fp16).
QUANT_NONE = 0
#: Quant-table entry of a head computed in FP8 (e4m3; kernels/quant.py).
QUANT_FP8 = 1
#: Name suffix of an FP8 method: ``full+fp8``, ``arrow/8+fp8``.
_FP8_SUFFIX = "+fp8"
_ASCII_FACTOR = re.compile(r"[1-9][0-9]{0,8}")

# Any window w >= 0 is an arrow band: keep (q, k) iff q < T or k < T or |q - k| <= w (image tokens); with
# reference latents after the image, |o(q) - o(k)| <= w on offsets inside each segment (masks.py).
#: Largest factor a plan may name (half-width N // (2f) is 0 for any real image beyond this).
MAX_ARROW_FACTOR = 4096


class MethodKind(str, enum.Enum):
    """How one head of one layer is computed at one schedule position."""

    FULL = "full"  # dense attention
    ARROW = "arrow"  # text rows/cols dense, image->image only inside a band
    CACHE = "cache"  # the head's output of the previous forward is reused


class Quant(str, enum.Enum):
    """The arithmetic of a computed head: the inputs' dtype, or FP8 (kernels/quant.py)."""

    NONE = "none"
    FP8 = "fp8"


@dataclass(frozen=True, order=True)
class HeadMethod:
    """One head's method. `factor` is the arrow factor f (0 for other kinds); `quant` how its kept pairs are
    computed (`Quant.FP8`: the FP8 scheme of kernels/quant.py; cache heads compute nothing and take none).

    An arrow head keeps (q, k) iff q < T or k < T or |q - k| <= N // (2 f), with T text tokens first
    and N image tokens after them. Storing f rather than a token count keeps a plan valid across
    resolutions.
    """

    kind: MethodKind
    factor: int = 0
    quant: Quant = Quant.NONE

    def __post_init__(self) -> None:
        if self.kind is MethodKind.ARROW:
            if not (isinstance(self.factor, int) and 1 <= self.factor <= MAX_ARROW_FACTOR):
                raise ValueError(f"arrow factor must be an int in [1, {MAX_ARROW_FACTOR}], got {self.factor!r}")
        elif self.factor != 0:
            raise ValueError(f"{self.kind.value} takes no factor, got {self.factor!r}")
        if not isinstance(self.quant, Quant):
            raise ValueError(f"quant must be a Quant, got {self.quant!r}")
        if self.kind is MethodKind.CACHE and self.quant is not Quant.NONE:
            raise ValueError("cache computes nothing, so it takes no quantization (got cache+fp8)")

    @property
    def fp8(self) -> bool:
        """True when this head's kept pairs are computed in FP8."""
        return self.quant is Quant.FP8

    @property
    def base(self) -> HeadMethod:
        """The same method without quantization (what an FP8 head runs where FP8 cannot)."""
        return self if self.quant is Quant.NONE else HeadMethod(self.kind, self.factor)

    def with_fp8(self) -> HeadMethod:
        """The FP8 variant of this full or arrow method (ValueError for cache)."""
        return HeadMethod(self.kind, self.factor, Quant.FP8)

    @property
    def name(self) -> str:
        """Canonical name as written in plan files: ``full``, ``cache``, ``arrow/8``, ``full+fp8``, ``arrow/8+fp8``."""
        base = f"arrow/{self.factor}" if self.kind is MethodKind.ARROW else self.kind.value
        return base + _FP8_SUFFIX if self.quant is Quant.FP8 else base

    def window(self, n_img_tokens: int) -> int:
        """This head's window at N image tokens: `WINDOW_FULL`, `WINDOW_SKIP` (cache) or the arrow band
        half-width ``N // (2 f)`` (>= 0)."""
        if self.kind is MethodKind.ARROW:
            return n_img_tokens // (2 * self.factor)
        return WINDOW_FULL if self.kind is MethodKind.FULL else WINDOW_SKIP

    @classmethod
    def parse(cls, name: str) -> HeadMethod:
        """Inverse of `name`; raises ValueError naming the bad value."""
        if not isinstance(name, str):
            raise ValueError(f"method name must be a string, got {type(name).__name__}")
        base, quant = name, Quant.NONE
        if name.endswith(_FP8_SUFFIX):
            base, quant = name[: -len(_FP8_SUFFIX)], Quant.FP8
        if base == "full":
            return FULL if quant is Quant.NONE else FULL_FP8
        if base == "cache" and quant is Quant.NONE:
            return CACHE
        kind, sep, factor = base.partition("/")
        # ASCII digits only: str.isdigit() and int() also accept other scripts' digits (arrow/١).
        if kind == "arrow" and sep and _ASCII_FACTOR.fullmatch(factor):
            return cls(MethodKind.ARROW, int(factor), quant)
        raise ValueError(
            f"unknown method {name!r}; expected 'full', 'cache', 'arrow/<factor>', 'full+fp8' or 'arrow/<factor>+fp8'"
        )

    def __str__(self) -> str:
        return self.name


FULL = HeadMethod(MethodKind.FULL)
CACHE = HeadMethod(MethodKind.CACHE)
FULL_FP8 = HeadMethod(MethodKind.FULL, quant=Quant.FP8)


def arrow(factor: int, *, fp8: bool = False) -> HeadMethod:
    """The arrow method with factor f (half-width N // (2 f)); with `fp8` its FP8 variant ``arrow/<f>+fp8``."""
    return HeadMethod(MethodKind.ARROW, factor, Quant.FP8 if fp8 else Quant.NONE)


@dataclass(frozen=True)
class LayerDecision:
    """The methods of all heads of one attention layer at one schedule position.

    Derived groups (sorted head indices) are computed once here so the hot path never loops over
    heads in Python: `full_heads`, `cache_heads`, `arrow_heads` and `arrow_groups` (factor -> heads) hold the
    heads computed in the inputs' dtype; FP8 heads are in `fp8_heads` and `fp8_groups` (method -> heads) only, so
    `all_full` means "every head full, none FP8" (the dense bypass). `quant` is the per-head quant table
    (`QUANT_NONE` / `QUANT_FP8`) and `unquantized` the same decision with every FP8 head in its base method.
    """

    methods: tuple[HeadMethod, ...]
    full_heads: tuple[int, ...] = field(init=False, repr=False, compare=False)
    cache_heads: tuple[int, ...] = field(init=False, repr=False, compare=False)
    arrow_heads: tuple[int, ...] = field(init=False, repr=False, compare=False)
    arrow_groups: tuple[tuple[int, tuple[int, ...]], ...] = field(init=False, repr=False, compare=False)
    fp8_heads: tuple[int, ...] = field(init=False, repr=False, compare=False)
    fp8_groups: tuple[tuple[HeadMethod, tuple[int, ...]], ...] = field(init=False, repr=False, compare=False)
    quant: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _unquantized: LayerDecision | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        methods = tuple(self.methods)
        if not methods:
            raise ValueError("a layer decision needs at least one head")
        object.__setattr__(self, "methods", methods)
        kinds = [None if m.fp8 else m.kind for m in methods]  # None: an FP8 head, in none of the plain groups
        object.__setattr__(self, "full_heads", tuple(h for h, k in enumerate(kinds) if k is MethodKind.FULL))
        object.__setattr__(self, "cache_heads", tuple(h for h, k in enumerate(kinds) if k is MethodKind.CACHE))
        object.__setattr__(self, "arrow_heads", tuple(h for h, k in enumerate(kinds) if k is MethodKind.ARROW))
        groups: dict[int, list[int]] = {}
        for h in self.arrow_heads:
            groups.setdefault(methods[h].factor, []).append(h)
        object.__setattr__(self, "arrow_groups", tuple((f, tuple(hs)) for f, hs in sorted(groups.items())))
        fp8 = tuple(h for h, k in enumerate(kinds) if k is None)
        object.__setattr__(self, "fp8_heads", fp8)
        fp8_groups: dict[HeadMethod, list[int]] = {}
        for h in fp8:
            fp8_groups.setdefault(methods[h], []).append(h)
        object.__setattr__(self, "fp8_groups", tuple((m, tuple(hs)) for m, hs in sorted(fp8_groups.items())))
        object.__setattr__(self, "quant", tuple(QUANT_FP8 if k is None else QUANT_NONE for k in kinds))
        # built once: the engine asks for it on every call where FP8 cannot run
        plain = LayerDecision(tuple(m.base for m in methods)) if fp8 else None
        object.__setattr__(self, "_unquantized", plain)

    @classmethod
    def uniform(cls, method: HeadMethod, heads: int) -> LayerDecision:
        return cls((method,) * heads)

    @property
    def heads(self) -> int:
        return len(self.methods)

    @property
    def all_full(self) -> bool:
        """Every head full in the inputs' dtype (no FP8, no arrow, no cache): exactly dense attention."""
        return len(self.full_heads) == len(self.methods)

    @property
    def unquantized(self) -> LayerDecision:
        """This decision with each FP8 head in its base method (how it runs where FP8 cannot); itself if none."""
        return self if self._unquantized is None else self._unquantized

    def windows(self, n_img_tokens: int) -> tuple[int, ...]:
        """Per head, its window at N image tokens (see `HeadMethod.window`)."""
        return tuple(m.window(n_img_tokens) for m in self.methods)
