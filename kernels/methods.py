"""The per-head vocabulary of DiTFastAttnV2: a head's method (full, arrow/f, cache) and its window.

A head's method is a small frozen value (`HeadMethod`); a layer's decision at one schedule position is a
`LayerDecision` (one method per head) that precomputes the head groups the engine and kernels need. At a
given image size a method becomes a *window*, the one integer encoding that the masks, the cost model, the
engine and the Triton kernel's per-head table all use: `WINDOW_FULL`, `WINDOW_SKIP` or a band half-width.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

__all__ = [
    "MethodKind",
    "HeadMethod",
    "LayerDecision",
    "FULL",
    "CACHE",
    "arrow",
    "MAX_ARROW_FACTOR",
    "WINDOW_FULL",
    "WINDOW_SKIP",
]

#: Window of a full head: every (q, k) pair is computed.
WINDOW_FULL = -1
#: Window of a head that is not computed here (a cached head: its output is pasted from the head cache).
WINDOW_SKIP = -2
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


@dataclass(frozen=True, order=True)
class HeadMethod:
    """One head's method. `factor` is the arrow factor f (0 for other kinds).

    An arrow head keeps (q, k) iff q < T or k < T or |q - k| <= N // (2 f), with T text tokens first
    and N image tokens after them. Storing f rather than a token count keeps a plan valid across
    resolutions.
    """

    kind: MethodKind
    factor: int = 0

    def __post_init__(self) -> None:
        if self.kind is MethodKind.ARROW:
            if not (isinstance(self.factor, int) and 1 <= self.factor <= MAX_ARROW_FACTOR):
                raise ValueError(f"arrow factor must be an int in [1, {MAX_ARROW_FACTOR}], got {self.factor!r}")
        elif self.factor != 0:
            raise ValueError(f"{self.kind.value} takes no factor, got {self.factor!r}")

    @property
    def name(self) -> str:
        """Canonical name as written in plan files: ``full``, ``cache``, ``arrow/8``."""
        return f"arrow/{self.factor}" if self.kind is MethodKind.ARROW else self.kind.value

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
        if name == "full":
            return FULL
        if name == "cache":
            return CACHE
        kind, sep, factor = name.partition("/")
        # ASCII digits only: str.isdigit() and int() also accept other scripts' digits (arrow/١).
        if kind == "arrow" and sep and _ASCII_FACTOR.fullmatch(factor):
            return cls(MethodKind.ARROW, int(factor))
        raise ValueError(f"unknown method {name!r}; expected 'full', 'cache' or 'arrow/<factor>'")

    def __str__(self) -> str:
        return self.name


FULL = HeadMethod(MethodKind.FULL)
CACHE = HeadMethod(MethodKind.CACHE)


def arrow(factor: int) -> HeadMethod:
    """The arrow method with factor f (half-width N // (2 f))."""
    return HeadMethod(MethodKind.ARROW, factor)


@dataclass(frozen=True)
class LayerDecision:
    """The methods of all heads of one attention layer at one schedule position.

    Derived groups (sorted head indices) are computed once here so the hot path never loops over
    heads in Python: `full_heads`, `cache_heads`, `arrow_heads` and `arrow_groups` (factor -> heads).
    """

    methods: tuple[HeadMethod, ...]
    full_heads: tuple[int, ...] = field(init=False, repr=False, compare=False)
    cache_heads: tuple[int, ...] = field(init=False, repr=False, compare=False)
    arrow_heads: tuple[int, ...] = field(init=False, repr=False, compare=False)
    arrow_groups: tuple[tuple[int, tuple[int, ...]], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        methods = tuple(self.methods)
        if not methods:
            raise ValueError("a layer decision needs at least one head")
        object.__setattr__(self, "methods", methods)
        kinds = [m.kind for m in methods]
        object.__setattr__(self, "full_heads", tuple(h for h, k in enumerate(kinds) if k is MethodKind.FULL))
        object.__setattr__(self, "cache_heads", tuple(h for h, k in enumerate(kinds) if k is MethodKind.CACHE))
        object.__setattr__(self, "arrow_heads", tuple(h for h, k in enumerate(kinds) if k is MethodKind.ARROW))
        groups: dict[int, list[int]] = {}
        for h in self.arrow_heads:
            groups.setdefault(methods[h].factor, []).append(h)
        object.__setattr__(self, "arrow_groups", tuple((f, tuple(hs)) for f, hs in sorted(groups.items())))

    @classmethod
    def uniform(cls, method: HeadMethod, heads: int) -> LayerDecision:
        return cls((method,) * heads)

    @property
    def heads(self) -> int:
        return len(self.methods)

    @property
    def all_full(self) -> bool:
        return len(self.full_heads) == len(self.methods)

    def windows(self, n_img_tokens: int) -> tuple[int, ...]:
        """Per head, its window at N image tokens (see `HeadMethod.window`)."""
        return tuple(m.window(n_img_tokens) for m in self.methods)
