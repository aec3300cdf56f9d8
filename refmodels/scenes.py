"""Procedural captioned scenes with machine-checkable ground truth (no downloads, deterministic per seed).

A scene is a background (colour + texture) and 1-4 object groups, each in its own cell of a 3x3 grid: a count
(1-3), a size, a colour, a shape and a texture. The caption names every attribute, e.g.

    "two small red circles at the top left, a large striped blue square in the center, on a checkered gray
     background"

so a model must read the text (colours, shapes, counts) and bind it to the image layout (positions). Groups are
listed in random order, so the position words, not the word order, say where a group goes. `render` draws
scenes at any size (batched signed-distance fields in torch, CPU or GPU); `score` checks a generated image
against its scene: per group, the right colour in the right cell, the right number of objects, and (for single
objects) the right shape; plus the background colour.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "Group", "Scene", "sample_scenes", "caption", "render", "score", "VOCAB",
    "COLORS", "SHAPES", "BACKGROUNDS", "CELLS",
]

#: Object colours (RGB in [0, 1]); far apart so that a blurred pixel still classifies.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.72, 0.20), "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10), "purple": (0.58, 0.20, 0.80), "orange": (1.00, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97), "black": (0.05, 0.05, 0.05),
}
#: Background colours, disjoint from the object colours.
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "gray": (0.50, 0.50, 0.50), "beige": (0.86, 0.78, 0.60), "teal": (0.18, 0.50, 0.50),
    "pink": (0.96, 0.68, 0.76), "brown": (0.45, 0.30, 0.18),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.055, "large": 0.11}  # radius as a fraction of the image side
OBJECT_TEXTURES = ("plain", "striped")
BG_TEXTURES = ("plain", "striped", "checkered", "gradient")
#: 3x3 grid cells, row-major: (row, col) -> the caption's position phrase.
CELLS: dict[tuple[int, int], str] = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
SHADE = 0.6  # stripes alternate the colour with SHADE x colour
_SMALL_FOR_GROUPS = 0.045  # radius of each object in a group of 2 or 3


@dataclasses.dataclass(frozen=True)
class Group:
    """`count` identical objects in one grid cell."""

    count: int
    size: str
    color: str
    shape: str
    texture: str
    cell: tuple[int, int]
    jitter: tuple[float, float]  # centre offset, fraction of the image side


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    bg_texture: str
    groups: tuple[Group, ...]

    @property
    def caption(self) -> str:
        return caption(self)


def sample_scenes(n: int, seed: int) -> list[Scene]:
    """`n` scenes from `seed` (numpy PCG64: the same on every platform and version)."""
    rng = np.random.default_rng(seed)
    cells = list(CELLS)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 5))
        picked = rng.choice(len(cells), size=k, replace=False)
        groups = []
        for ci in picked:
            count = int(rng.choice([1, 1, 2, 3]))
            groups.append(Group(
                count=count,
                size=str(rng.choice(list(SIZES))) if count == 1 else "small",
                color=str(rng.choice(list(COLORS))),
                shape=str(rng.choice(SHAPES)),
                texture=str(rng.choice(OBJECT_TEXTURES, p=[0.7, 0.3])),
                cell=cells[int(ci)],
                jitter=(float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03))),
            ))
        out.append(Scene(
            background=str(rng.choice(list(BACKGROUNDS))),
            bg_texture=str(rng.choice(BG_TEXTURES)),
            groups=tuple(groups),
        ))
    return out


def caption(scene: Scene) -> str:
    parts = []
    for g in scene.groups:
        words = [COUNT_WORDS[g.count], g.size]
        if g.texture != "plain":
            words.append(g.texture)
        words += [g.color, g.shape + ("s" if g.count > 1 else ""), CELLS[g.cell]]
        parts.append(" ".join(words))
    bg = ("" if scene.bg_texture == "plain" else scene.bg_texture + " ") + scene.background
    return ", ".join(parts) + f", on a {bg} background"


def _vocab() -> tuple[str, ...]:
    words = {",", "on", "a", "background"} | set(COUNT_WORDS.values()) | set(SIZES) | set(COLORS) | set(BACKGROUNDS)
    words |= {t for t in OBJECT_TEXTURES + BG_TEXTURES if t != "plain"}
    words |= set(SHAPES) | {s + "s" for s in SHAPES}
    for phrase in CELLS.values():
        words |= set(phrase.split())
    return tuple(sorted(words))


#: Every word a caption can contain (the tokenizer's vocabulary, without its special tokens).
VOCAB = _vocab()


# ------------------------------------------------------------------------------------------ rendering


def _centres(g: Group) -> list[tuple[float, float, float]]:
    """(x, y, radius) of each object of a group, as fractions of the image side."""
    cy = (g.cell[0] + 0.5) / 3 + g.jitter[1]
    cx = (g.cell[1] + 0.5) / 3 + g.jitter[0]
    if g.count == 1:
        return [(cx, cy, SIZES[g.size])]
    r, d = _SMALL_FOR_GROUPS, 0.075
    if g.count == 2:
        return [(cx - d, cy, r), (cx + d, cy, r)]
    return [(cx - d, cy + 0.055, r), (cx + d, cy + 0.055, r), (cx, cy - 0.065, r)]


def _sdf(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance (negative inside), in the units of dx, dy."""
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
    if shape == "diamond":
        return (dx.abs() + dy.abs() - 1.2 * r) * 0.7071
    # equilateral triangle pointing up, centroid at the centre, circumradius 1.2 r
    R = 1.2 * r
    k = 3.0 ** 0.5
    px, py = dx.abs(), -dy  # image y grows downwards; the apex points up
    e1 = (k * px + py - R) * 0.5  # the two slanted edges
    e2 = -py - R * 0.5  # the base
    return torch.maximum(e1, e2)


def render(scenes: Sequence[Scene], size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Scenes as images `[B, 3, size, size]` in [0, 1] (float32), anti-aliased over about one pixel.

    Vectorised over all objects of a chunk of scenes (objects never overlap: each group has its own cell), so a
    chunk costs a few dozen kernel launches on a GPU; chunks bound the temporary memory."""
    dev = torch.device(device)
    chunk = max(1, (2**27 if dev.type == "cuda" else 2**23) // (size * size * 8))
    if len(scenes) > chunk:
        return torch.cat([_render(scenes[i:i + chunk], size, dev) for i in range(0, len(scenes), chunk)])
    return _render(scenes, size, dev)


def _render(scenes: Sequence[Scene], size: int, dev: torch.device) -> torch.Tensor:
    b = len(scenes)
    coords = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    bg_tex = list(BG_TEXTURES)
    base = torch.tensor([BACKGROUNDS[s.background] for s in scenes], device=dev).view(b, 3, 1, 1)
    tex = torch.tensor([bg_tex.index(s.bg_texture) for s in scenes], device=dev)
    patterns = torch.stack([
        torch.zeros_like(xx),
        (torch.sin((xx + yy) * (2 * np.pi * 8 / 1.4142)) > 0).float(),  # diagonal stripes, period 1/8
        ((torch.floor(xx * 8) + torch.floor(yy * 8)) % 2).float(),  # checkered, 8 x 8
        yy,  # vertical gradient
    ])
    img = base * (1 - 0.3 * patterns[tex].unsqueeze(1))
    objs = [(i, g, c) for i, s in enumerate(scenes) for g in s.groups for c in _centres(g)]
    if not objs:
        return img
    idx = torch.tensor([o[0] for o in objs], device=dev)
    p = torch.tensor([o[2] for o in objs], device=dev, dtype=torch.float32)  # [n, 3]: x, y, r
    shape = torch.tensor([SHAPES.index(o[1].shape) for o in objs], device=dev)
    col = torch.tensor([COLORS[o[1].color] for o in objs], device=dev).view(-1, 3, 1, 1)
    striped = torch.tensor([o[1].texture == "striped" for o in objs], device=dev).view(-1, 1, 1, 1)
    stripes = (torch.sin(yy * (2 * np.pi * 32)) > 0).float()  # horizontal, period 1/32
    col = col * torch.where(striped, 1 - (1 - SHADE) * stripes, torch.ones_like(stripes))
    dx = xx[None] - p[:, 0, None, None]
    dy = yy[None] - p[:, 1, None, None]
    r = p[:, 2, None, None]
    sdf = torch.stack([_sdf(name, dx, dy, r) for name in SHAPES])  # [4, n, H, W]
    sdf = sdf.gather(0, shape.view(1, -1, 1, 1).expand(1, *dx.shape))[0]
    cov = (0.5 - sdf * size).clamp(0, 1).unsqueeze(1)  # [n, 1, H, W]
    cover = torch.zeros(b, 1, size, size, device=dev).index_add_(0, idx, cov)
    paint = torch.zeros(b, 3, size, size, device=dev).index_add_(0, idx, col * cov)
    return img * (1 - cover) + paint


# -------------------------------------------------------------------------------------------- scoring


def _palette() -> tuple[np.ndarray, list[str]]:
    names, cols = [], []
    for n, c in COLORS.items():
        names += [n, n]
        cols += [c, tuple(SHADE * v for v in c)]
    for n, c in BACKGROUNDS.items():
        names += ["bg:" + n, "bg:" + n]
        cols += [c, tuple(0.7 * v for v in c)]
    return np.asarray(cols, dtype=np.float32), names


_PALETTE, _PALETTE_NAMES = _palette()


def _classify(img: np.ndarray) -> np.ndarray:
    """Per pixel: index into the palette names of the nearest palette colour. img: [H, W, 3]."""
    d = ((img[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def _template_iou(mask: np.ndarray, shape: str) -> float:
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    h = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    r_of = {"circle": 0.5, "square": 0.5 / 0.85, "diamond": 0.5 / 1.2, "triangle": 0.5 / (1.2 * 0.866)}
    r = h * r_of[shape]
    gy, gx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]].astype(np.float32)
    dy = torch.from_numpy(gy - cy + (0.15 * r if shape == "triangle" else 0.0))  # centroid below the bbox centre
    t = (_sdf(shape, torch.from_numpy(gx - cx), dy, r) < 0).numpy()
    inter = np.logical_and(t, mask).sum()
    return float(inter / max(np.logical_or(t, mask).sum(), 1))


def score(images: torch.Tensor, scenes: Sequence[Scene]) -> dict[str, float]:
    """Ground-truth accuracy of generated images `[B, 3, H, W]` (values in [0, 1]) against their scenes.

    Per group: `color` (at least a third of the expected object area in the group's cell has the named colour
    or its stripe shade), `count` (connected components of that colour in the cell, small specks ignored, equal
    the caption's count), `shape` (single objects: the named shape's template fits best, by IoU). `object` is
    all three at once (shape only where checked); `background` compares the majority background class of the
    image's border. Returns the means over groups / images.
    """
    from scipy import ndimage

    imgs = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    tot = {"color": 0, "count": 0, "shape": 0, "object": 0}
    n_groups = n_shapes = bg_ok = 0
    for img, sc in zip(imgs, scenes):
        size = img.shape[0]
        cls = _classify(img)
        names = np.asarray(_PALETTE_NAMES)[cls]
        border = np.concatenate([names[:2].ravel(), names[-2:].ravel(), names[:, :2].ravel(), names[:, -2:].ravel()])
        vals, counts = np.unique(border, return_counts=True)
        bg_ok += int(vals[counts.argmax()] == "bg:" + sc.background)
        for g in sc.groups:
            r0, c0 = g.cell
            sl = (slice(r0 * size // 3, (r0 + 1) * size // 3), slice(c0 * size // 3, (c0 + 1) * size // 3))
            mask = names[sl] == g.color
            one_area = (np.pi if g.shape == "circle" else 2.0) * (_centres(g)[0][2] * size) ** 2
            col_ok = mask.sum() >= one_area * g.count / 3
            lab, n = ndimage.label(ndimage.binary_closing(mask, iterations=2))
            areas = ndimage.sum(mask, lab, range(1, n + 1)) if n else np.zeros(0)
            big = [i + 1 for i, a in enumerate(areas) if a >= 0.25 * one_area]
            cnt_ok = len(big) == g.count
            ok = col_ok and cnt_ok
            if g.count == 1:
                n_shapes += 1
                shp_ok = False
                if col_ok and big:
                    comp = lab == max(big, key=lambda j: areas[j - 1])
                    ious = {s: _template_iou(comp, s) for s in SHAPES}
                    shp_ok = max(ious, key=ious.__getitem__) == g.shape
                tot["shape"] += int(shp_ok)
                ok = ok and shp_ok
            tot["color"] += int(col_ok)
            tot["count"] += int(cnt_ok)
            tot["object"] += int(ok)
            n_groups += 1
    res = {k: v / max(n_groups, 1) for k, v in tot.items() if k != "shape"}
    res["shape"] = tot["shape"] / max(n_shapes, 1)
    res["background"] = bg_ok / max(len(scenes), 1)
    return res
