"""A picture of a plan: one row per schedule position (step), one column block per attention layer, each split into
its heads, one colour per method; a title with the calibration record, a legend with each method's share, the
attention FLOPs kept (`cli.flops_kept`) and a per-step share bar. numpy + Pillow only (no host import).
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..kernels.methods import HeadMethod, MethodKind
from .cli import flops_kept, tile_label, time_kept
from .plan import Plan

__all__ = ["PlanPicture", "method_colours", "draw_plan", "save_plan_picture"]

RGB = tuple[int, int, int]

# Fixed colours for the methods DFACalibrate offers, so two plans compare at a glance: full is neutral grey,
# arrows are blues that darken as the band narrows (more saved), cache is orange (colour-blind safe against blue).
# FP8 variants sit next to their method: full+fp8 a darker grey, arrow/f+fp8 the purples (ColorBrewer "Purples",
# the hue next to blue) that darken with the band like the blues. Cells can be one pixel wide (Flux-dev), so FP8 is
# a colour, not a hatch.
_FIXED: dict[str, RGB] = {
    "full": (212, 212, 212),
    "full+fp8": (140, 140, 140),
    "arrow/8": (158, 202, 225),
    "arrow/16": (66, 146, 198),
    "arrow/32": (8, 48, 107),
    "arrow/8+fp8": (188, 189, 220),
    "arrow/16+fp8": (128, 125, 186),
    "arrow/32+fp8": (84, 39, 143),
    "cache": (242, 142, 43),
}
# Any other method of the vocabulary (another arrow factor, a future kind) takes the next of these, in legend order.
_SPARE: tuple[RGB, ...] = (
    (148, 103, 189), (44, 160, 44), (214, 39, 40), (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207),
    (127, 127, 127), (255, 187, 120), (152, 223, 138),
)
_BACKGROUND: RGB = (255, 255, 255)
_INK: RGB = (20, 20, 20)
_MUTED: RGB = (90, 90, 90)


def _legend_order(methods: Sequence[HeadMethod]) -> list[HeadMethod]:
    # full first, then arrows from widest to narrowest band, then cache: the order of increasing saving; each FP8
    # variant right after its method
    rank = {MethodKind.FULL: 0, MethodKind.ARROW: 1, MethodKind.CACHE: 2}
    return sorted(set(methods), key=lambda m: (rank[m.kind], m.factor, m.fp8))


def method_colours(methods: Sequence[HeadMethod]) -> dict[HeadMethod, RGB]:
    """A distinct RGB colour per method, in legend order (full, arrows by factor, cache; each FP8 variant after its
    method): the fixed colour of a known method name, else the next unused spare (then evenly spaced hues) for
    anything else."""
    order = _legend_order(methods)
    out: dict[HeadMethod, RGB] = {m: _FIXED[m.name] for m in order if m.name in _FIXED}
    used = set(out.values())
    spare = (c for c in _SPARE if c not in used)
    extra = 0
    for m in order:
        if m in out:
            continue
        colour = next(spare, None)
        while colour is None or colour in used:  # past the spares: golden-ratio hues, never a repeat
            r, g, b = colorsys.hsv_to_rgb((extra * 0.618034) % 1.0, 0.65, 0.85)
            colour, extra = (round(r * 255), round(g * 255), round(b * 255)), extra + 1
        out[m] = colour
        used.add(colour)
    return {m: out[m] for m in order}


@dataclass(frozen=True)
class PlanPicture:
    """The drawn picture and where things are in it (for tests and front ends).

    image: [H, W, 3] uint8 RGB. colours: method name -> RGB in legend order. The heat map's cell of (position p,
    layer l, head h) is `cell(p, l, h)`; legend swatches are `legend_boxes[name]`; boxes are (x0, y0, x1, y1),
    end-exclusive.
    """

    image: np.ndarray
    colours: dict[str, RGB]
    shares: dict[str, float]
    flops_kept: tuple[float, float]
    grid_x: tuple[int, ...]  # x of each layer's first head column
    grid_y: int
    head_width: int  # pitch of the head columns
    head_fill: int  # coloured width of a head column (a 1-px gap follows when heads are wide)
    row_height: int  # coloured rows (a 1-px gap follows when rows are tall enough)
    row_pitch: int
    legend_boxes: dict[str, tuple[int, int, int, int]]

    def cell(self, position: int, layer: int, head: int) -> tuple[int, int, int, int]:
        x0 = self.grid_x[layer] + head * self.head_width
        y0 = self.grid_y + position * self.row_pitch
        return x0, y0, x0 + self.head_fill, y0 + self.row_height


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _wrap(draw: Any, text: str, font: Any, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}" if line else word
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line]


def _drawable(text: str) -> str:
    # Pillow's bundled font has no multiplication sign (ModelSignature.describe uses one)
    return text.replace("\u00d7", "x")


def _title_lines(plan: Plan) -> tuple[str, str]:
    cal = plan.calibration
    head = plan.description or "DiTFastAttnV2 plan"
    model = plan.model.describe()
    if cal is None:
        return head, f"{model}; {len(plan.positions)} positions; no calibration record (hand-made plan)"
    guidance = "" if cal.guidance is None else f", guidance {cal.guidance:g}"
    return head, (
        f"{model}; calibrated at {cal.width}x{cal.height}, delta {cal.delta:g}, {cal.steps} steps "
        f"{cal.sampler}/{cal.scheduler}, cfg {cal.cfg:g}{guidance}, {cal.prompts} prompt(s), seed {cal.seed}"
    )


def draw_plan(
    plan: Plan,
    *,
    width: int | None = None,
    height: int | None = None,
    txt_len: int | None = None,
    grid_width: int = 900,
) -> PlanPicture:
    """Draw `plan` as a heat map: rows = positions (first step on top), columns = layers in forward order, each
    split into its heads, one colour per method (`method_colours`). The header has the description, the model and
    calibration record, a legend with each method's share of all (position, layer, head) entries and the attention
    FLOPs kept (`cli.flops_kept` at the calibration's size, or `width`/`height`/`txt_len`). A bar right of each
    row shows that step's method shares. Heads are `grid_width // heads` px wide (1 to 48), so Flux-dev (57 × 24
    heads) draws one pixel per head and a tiny model large cells."""
    from PIL import Image, ImageDraw

    cal = plan.calibration
    width = width or (cal.width if cal else 1024)
    height = height or (cal.height if cal else 1024)
    if txt_len is None:
        txt_len = cal.txt_len if cal else {"flux": 256, "flux2": 512}.get(plan.model.family, 154)
    exact, tiled = flops_kept(plan, width=width, height=height, txt_len=txt_len)
    cost = time_kept(plan, width=width, height=height, txt_len=txt_len)  # FP8 pairs weighed: the time bound

    layers = plan.model.layers
    all_methods = [m for counts in plan.layer_method_counts() for m in counts]
    colours = method_colours(all_methods)
    index = {m: i for i, m in enumerate(colours)}
    table = np.array(list(colours.values()), dtype=np.uint8)
    counts = plan.method_counts()
    total = sum(counts.values())
    shares = {m.name: counts[m.name] / total for m in colours}

    # method index per (position, head column); columns run through the layers' heads in forward order
    ids = np.array(
        [[index[m] for dec in pos.layers for m in dec.methods] for pos in plan.positions], dtype=np.int32
    ).reshape(len(plan.positions), -1)

    n_heads = ids.shape[1]
    head_w = max(1, min(48, grid_width // n_heads))
    n_pos = len(plan.positions)
    pitch = max(1, min(28, 480 // n_pos))
    row_h = pitch - 1 if pitch >= 6 else pitch  # a white line between steps when rows are tall enough
    # Wide heads get a 1-px gap of their own, so layers need a wider one; a group change (double / single) wider still.
    head_fill = head_w - 1 if head_w >= 8 else head_w
    layer_gap, group_gap = (4, 10) if head_fill < head_w else (1, 4)
    group = [spec.name.split(".")[0] for spec in layers]
    x_map: list[int] = []  # source head column per output x, -1 = gap
    starts: list[int] = []
    col = 0
    for li, spec in enumerate(layers):
        if li:
            x_map += [-1] * (group_gap if group[li] != group[li - 1] else layer_gap)
        starts.append(len(x_map))
        for h in range(spec.heads):
            x_map += [col + h] * head_fill + [-1] * (head_w - head_fill)
        col += spec.heads
    xm = np.array(x_map)
    rows = table[ids]  # [P, heads, 3]
    grid = np.full((n_pos * pitch, len(xm), 3), _BACKGROUND, dtype=np.uint8)
    body = rows[:, np.maximum(xm, 0)]
    body[:, xm < 0] = _BACKGROUND
    for p in range(n_pos):
        grid[p * pitch:p * pitch + row_h] = body[p]

    # per-step share bar (shares of the heads at that position, legend order)
    bar_w = 60
    bar = np.full((n_pos * pitch, bar_w, 3), _BACKGROUND, dtype=np.uint8)
    for p in range(n_pos):
        per = np.bincount(ids[p], minlength=len(table))
        edges = np.round(np.cumsum(per) / n_heads * bar_w).astype(int)
        x = 0
        for k, e in enumerate(edges):
            bar[p * pitch:p * pitch + row_h, x:e] = table[k]
            x = e

    f_title, f_text, f_small = _font(16), _font(13), _font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h, small_h = 18, 14
    label_every = max(1, -(-small_h // pitch))
    row_labels = [f"{p}" if p % label_every == 0 else "" for p in range(n_pos)]
    left = 16 + int(max(probe.textlength(t or "0", font=f_small) for t in row_labels + ["step"])) + 8
    grid_w = len(xm)
    canvas_w = max(left + grid_w + 12 + bar_w + 16, 640)
    text_w = canvas_w - 32

    title, record = map(_drawable, _title_lines(plan))
    header = [(line, f_title, _INK) for line in _wrap(probe, title, f_title, text_w)]
    header += [(line, f_text, _MUTED) for line in _wrap(probe, record, f_text, text_w)]
    flops = (f"attention FLOPs kept at {width}x{height} (text {txt_len} tokens): {100 * exact:.1f}% token-exact, "
             f"{100 * tiled:.1f}% at {tile_label(plan)} (attention-time bound {1 / max(cost, 1e-9):.2f}x)")
    header += [(line, f_text, _INK) for line in _wrap(probe, flops, f_text, text_w)]

    # legend entries, wrapped into rows
    sw = 14
    entries = [(m.name, f"{m.name} {100 * shares[m.name]:.1f}%") for m in colours]
    legend_rows: list[list[tuple[str, str, int]]] = [[]]
    x = 16
    for name, label in entries:
        w = sw + 6 + int(probe.textlength(label, font=f_text)) + 18
        if legend_rows[-1] and x + w > canvas_w - 16:
            legend_rows.append([])
            x = 16
        legend_rows[-1].append((name, label, x))
        x += w

    y_header = 12
    y_legend = y_header + len(header) * line_h + 8
    y_groups = y_legend + len(legend_rows) * (sw + 8) + 8
    y_grid = y_groups + 2 * small_h + 8
    canvas_h = y_grid + n_pos * pitch + 12 + small_h + 12
    img = Image.new("RGB", (canvas_w, canvas_h), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    y = y_header
    for line, font, ink in header:
        draw.text((16, y), line, fill=ink, font=font)
        y += line_h
    by_name = {m.name: c for m, c in colours.items()}
    boxes: dict[str, tuple[int, int, int, int]] = {}
    for r, row in enumerate(legend_rows):
        yy = y_legend + r * (sw + 8)
        for name, label, xx in row:
            boxes[name] = (xx, yy, xx + sw, yy + sw)
            draw.rectangle((xx, yy, xx + sw - 1, yy + sw - 1), fill=by_name[name], outline=_MUTED)
            draw.text((xx + sw + 6, yy), label, fill=_INK, font=f_text)

    # layer groups (double / single / joint) with their block range, then each layer's block index where it fits
    # (SD3.5-Medium's image-only attention of block i is "ia")
    gx = [left + s for s in starts]
    tags = [spec.name.split(".", 1)[1].replace(".attn2", "a") if "." in spec.name else spec.name for spec in layers]
    spans: list[tuple[str, int, int]] = []
    for li, g in enumerate(group):
        if spans and spans[-1][0] == g:
            spans[-1] = (g, spans[-1][1], li)
        else:
            spans.append((g, li, li))
    for g, a, b in spans:
        x0, x1 = gx[a], gx[b] + layers[b].heads * head_w
        first, last = tags[a].rstrip("a"), tags[b].rstrip("a")
        label = f"{g} {first}-{last}" if first != last else f"{g} {first}"
        if probe.textlength(label, font=f_small) > x1 - x0:
            label = g[:1]
        draw.line((x0, y_groups + small_h + 2, x1 - 1, y_groups + small_h + 2), fill=_MUTED)
        draw.text((x0, y_groups), label, fill=_INK, font=f_small)
    last_end = -1.0
    for li in range(len(layers)):
        if gx[li] > last_end + 4:
            draw.text((gx[li], y_groups + small_h + 4), tags[li], fill=_MUTED, font=f_small)
            last_end = gx[li] + probe.textlength(tags[li], font=f_small)
    draw.text((16, y_grid - small_h - 4), "step", fill=_MUTED, font=f_small)
    for p, t in enumerate(row_labels):
        if t:
            draw.text((16, y_grid + p * pitch + max(0, (row_h - small_h) // 2)), t, fill=_MUTED, font=f_small)
    bar_x = left + grid_w + 12
    draw.text((bar_x, y_grid - small_h - 4), "per step", fill=_MUTED, font=f_small)
    footer = ("rows: sampling steps (first on top); columns: attention layers in forward order, each split into its "
              "heads" + ("; 'Na': block N's image-only attention" if any(s.image_only for s in layers) else ""))
    draw.text((16, y_grid + n_pos * pitch + 10), footer, fill=_MUTED, font=f_small)

    out = np.array(img)
    out[y_grid:y_grid + grid.shape[0], left:left + grid_w] = grid
    out[y_grid:y_grid + bar.shape[0], bar_x:bar_x + bar_w] = bar
    return PlanPicture(
        image=out,
        colours=by_name,
        shares=shares,
        flops_kept=(exact, tiled),
        grid_x=tuple(gx),
        grid_y=y_grid,
        head_width=head_w,
        head_fill=head_fill,
        row_height=row_h,
        row_pitch=pitch,
        legend_boxes=boxes,
    )


def save_plan_picture(plan: Plan, path: str | Path, *, width: int | None = None, height: int | None = None,
                      txt_len: int | None = None) -> Path:
    """`draw_plan(plan, width=..., height=..., txt_len=...)` written to `path` (PNG for ``.png``; folders created)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(draw_plan(plan, width=width, height=height, txt_len=txt_len).image).save(path)
    return path
