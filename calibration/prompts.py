"""Default calibration prompts: eight varied scenes (people, animals, text, architecture, landscape,
macro, illustration, interior) so the per-head errors are not tuned to one kind of image."""

from __future__ import annotations

__all__ = ["DEFAULT_PROMPTS", "parse_prompts"]

DEFAULT_PROMPTS: tuple[str, ...] = (
    "a portrait photo of an elderly fisherman with a weathered face, soft window light, 85mm lens",
    "a red fox sitting in fresh snow in a birch forest at dawn, detailed fur",
    "a neon sign that reads 'OPEN ALL NIGHT' above a rainy city street at night, reflections on asphalt",
    "a gothic cathedral facade with intricate stone carvings, symmetric, overcast sky",
    "a wide mountain valley with a winding river and autumn trees, golden hour, aerial view",
    "macro photo of a dragonfly on a leaf covered with dew drops, shallow depth of field",
    "a watercolor illustration of a lighthouse on a cliff with crashing waves, loose brush strokes",
    "a cozy scandinavian living room with a fireplace, wooden floor and large plants, interior design photo",
)


def parse_prompts(text: str, *, limit: int = 64) -> list[str]:
    """One prompt per non-empty line (surrounding whitespace dropped); at most `limit` prompts."""
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("the prompt list is empty: write one prompt per line")
    if len(prompts) > limit:
        raise ValueError(f"{len(prompts)} prompts given; at most {limit} are calibrated in one batch")
    return prompts
