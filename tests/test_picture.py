"""The plan picture (calibration/picture.py): every cell of the heat map has exactly its method's colour, the gaps
and nothing else are background, the legend shows every method with its share, the numbers come from
`cli.flops_kept`, and the command line writes it (`inspect --png`)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dfav2.calibration import CalibrationRecord, LayerSpec, ModelSignature, Plan, PlanPosition, save_plan
from dfav2.calibration.cli import flops_kept
from dfav2.calibration.picture import draw_plan, method_colours, save_plan_picture
from dfav2.kernels import CACHE, FULL, LayerDecision, arrow
from dfav2.kernels.methods import HeadMethod

ROOT = Path(__file__).resolve().parent.parent
BACKGROUND = (255, 255, 255)


def random_plan(seed: int, family: str, layers: list[tuple[str, int, int]], positions: int,
                methods: list[HeadMethod], record: bool = True) -> Plan:
    rng = random.Random(seed)
    sig = ModelSignature(family, tuple(LayerSpec(n, h, d, n.endswith("attn2")) for n, h, d in layers))
    pos = []
    for p in range(positions):
        allowed = [m for m in methods if m != CACHE] if p == 0 else methods
        decs = tuple(LayerDecision(tuple(rng.choice(allowed) for _ in range(spec.heads))) for spec in sig.layers)
        pos.append(PlanPosition(round(1.0 - p / positions, 6), decs))
    cal = None
    if record:
        cal = CalibrationRecord(
            delta=0.25, candidates=("full",) + tuple(sorted({m.name for m in methods} - {"full"})), prompts=3,
            steps=positions, sampler="euler", scheduler="simple", cfg=1.0, guidance=3.5 if family == "flux" else None,
            width=512, height=768, txt_len=77, seed=1, host_version="0.30.0", pack_version="0.1.0",
            date="2026-11-28T00:00:00Z", wall_time_s=3.0)
    return Plan(sig, tuple(pos), cal, f"random {family} plan {seed}")


TINY_FLUX = [("double.0", 2, 128), ("double.1", 2, 128)] + [(f"single.{i}", 2, 128) for i in range(4)]
SD35M = [(n, 3, 64) for i in range(3) for n in ((f"joint.{i}", f"joint.{i}.attn2") if i < 2 else (f"joint.{i}",))]
CASES = {
    "tiny flux, 4 steps": ("flux", TINY_FLUX, 4, [FULL, CACHE, arrow(8), arrow(16), arrow(32)]),
    "sd3.5m-like, odd arrows": ("sd3", SD35M, 7, [FULL, CACHE, arrow(4), arrow(8), arrow(64), arrow(3)]),
    "one layer, 40 steps": ("sd3", [("joint.0", 5, 64)], 40, [FULL, arrow(16), CACHE]),
    "wide: 12 x 24 heads": ("flux", [(f"single.{i}", 24, 128) for i in range(12)], 9, [FULL, CACHE, arrow(32)]),
}


def expected_grid(pic, plan: Plan) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The heat-map region as the plan says it must look: each cell its method's colour, the rest background."""
    last = len(plan.model.layers) - 1
    x0, y0 = pic.grid_x[0], pic.grid_y
    x1 = pic.grid_x[last] + plan.model.layers[last].heads * pic.head_width
    y1 = y0 + len(plan.positions) * pic.row_pitch
    want = np.full((y1 - y0, x1 - x0, 3), BACKGROUND, dtype=np.uint8)
    for p, pos in enumerate(plan.positions):
        for li, dec in enumerate(pos.layers):
            for h, m in enumerate(dec.methods):
                a, b, c, d = pic.cell(p, li, h)
                want[b - y0:d - y0, a - x0:c - x0] = pic.colours[m.name]
    return want, (x0, y0, x1, y1)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_each_cell_has_its_methods_colour_and_nothing_else_is_coloured(case, seed):
    family, layers, positions, methods = CASES[case]
    plan = random_plan(seed, family, layers, positions, methods)
    pic = draw_plan(plan)
    img = pic.image
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    want, (x0, y0, x1, y1) = expected_grid(pic, plan)
    assert x1 <= img.shape[1] and y1 <= img.shape[0]
    got = img[y0:y1, x0:x1]
    bad = np.argwhere((got != want).any(axis=2))
    assert bad.size == 0, f"{len(bad)} pixels differ, first at (y, x) {tuple(bad[0] + (y0, x0))}"
    # every method the plan uses has its own colour, distinct from the others and from the background
    used = {m.name for c in plan.layer_method_counts() for m in c}
    assert set(pic.colours) == used
    assert len(set(pic.colours.values()) | {BACKGROUND}) == len(used) + 1


@pytest.mark.parametrize("case", list(CASES))
def test_legend_shares_and_flops(case):
    family, layers, positions, methods = CASES[case]
    plan = random_plan(7, family, layers, positions, methods)
    pic = draw_plan(plan)
    counts = plan.method_counts()
    total = sum(counts.values())
    assert pic.shares == pytest.approx({n: counts[n] / total for n in counts})
    assert list(pic.colours)[0] == "full" and (list(pic.colours)[-1] == "cache") == ("cache" in counts)
    assert set(pic.legend_boxes) == set(counts)
    for name, (a, b, c, d) in pic.legend_boxes.items():  # the swatch's inside is the method's colour
        inner = pic.image[b + 1:d - 1, a + 1:c - 1].reshape(-1, 3)
        assert (inner == pic.colours[name]).all(), name
        assert d <= pic.grid_y  # the legend sits above the heat map
    cal = plan.calibration
    assert pic.flops_kept == flops_kept(plan, width=cal.width, height=cal.height, txt_len=cal.txt_len)
    assert draw_plan(plan, width=2048, height=2048, txt_len=512).flops_kept == flops_kept(
        plan, width=2048, height=2048, txt_len=512)


def test_sizes_flux_dev_and_tiny():
    flux = [(f"double.{i}", 24, 128) for i in range(19)] + [(f"single.{i}", 24, 128) for i in range(38)]
    big = draw_plan(random_plan(0, "flux", flux, 28, [FULL, CACHE, arrow(8), arrow(16), arrow(32)]))
    h, w, _ = big.image.shape
    assert big.head_width == 1 and 1300 < w < 1700 and 400 < h < 800, big.image.shape
    assert big.row_height >= 10  # 28 steps stay readable rows
    tiny = draw_plan(random_plan(0, "flux", TINY_FLUX, 4, [FULL, CACHE, arrow(8)]))
    assert tiny.head_width >= 40 and tiny.row_height >= 20 and tiny.image.shape[1] >= 640
    long = draw_plan(random_plan(0, "sd3", [("joint.0", 2, 64)], 400, [FULL, CACHE]))
    assert long.row_pitch == 1 and long.image.shape[0] < 700


def test_no_record_and_many_methods_get_distinct_colours():
    many = [FULL, CACHE] + [arrow(f) for f in range(1, 40)]
    colours = method_colours(list(reversed(many)))
    assert list(colours)[:2] == [FULL, arrow(1)] and list(colours)[-1] == CACHE
    assert len(set(colours.values())) == len(many) and (255, 255, 255) not in colours.values()
    assert colours[arrow(8)] != colours[arrow(16)] != colours[arrow(32)]
    plan = random_plan(3, "sd3", [("joint.0", 41, 64), ("joint.1", 41, 64)], 3, many, record=False)
    pic = draw_plan(plan)
    want, (x0, y0, x1, y1) = expected_grid(pic, plan)
    assert (pic.image[y0:y1, x0:x1] == want).all()


def test_save_and_inspect_png(tmp_path):
    from PIL import Image

    plan = random_plan(5, "flux", TINY_FLUX, 4, [FULL, CACHE, arrow(8), arrow(16)])
    png = save_plan_picture(plan, tmp_path / "sub" / "p.png")
    assert (np.asarray(Image.open(png).convert("RGB")) == draw_plan(plan).image).all()
    path = save_plan(plan, tmp_path / "p.json")
    out = tmp_path / "cli.png"
    r = subprocess.run([sys.executable, str(ROOT), "inspect", str(path), "--png", str(out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "methods: full" in r.stdout and f"picture: {out}" in r.stdout
    assert (np.asarray(Image.open(out).convert("RGB")) == draw_plan(plan).image).all()
    r = subprocess.run([sys.executable, str(ROOT), "inspect", str(path), "--png", str(tmp_path / "p.nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot write the picture" in r.stderr and "Traceback" not in r.stderr
