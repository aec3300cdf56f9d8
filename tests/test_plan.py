"""Plan file format v1: round trip, one malformed example per validated field, hostile-input fuzzing,
atomic save, the command line."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfav2.calibration import CalibrationRecord, LayerSpec, ModelSignature, Plan, PlanError, PlanPosition, dumps_plan, load_plan, loads_plan, save_plan
from dfav2.calibration.plan import MAX_PLAN_BYTES, plan_to_dict
from dfav2.kernels import CACHE, FULL, LayerDecision, arrow

ROOT = Path(__file__).resolve().parent.parent


def make_plan(seed: int = 0, heads: int = 5, layers: int = 3, positions: int = 6) -> Plan:
    rng = random.Random(seed)
    model = ModelSignature(
        "sd3",
        tuple(LayerSpec(f"joint.{i}", heads, 64) for i in range(layers - 1)) + (LayerSpec("joint.0.attn2", heads, 64, True),),
    )
    choices = [FULL, CACHE, arrow(8), arrow(16), arrow(32)]
    pos = []
    for p in range(positions):
        decs = []
        for _ in range(layers):
            ms = tuple(FULL if p == 0 else rng.choice(choices) for _ in range(heads))
            decs.append(LayerDecision(ms))
        pos.append(PlanPosition(round(1.0 - p / positions, 6), tuple(decs)))
    cal = CalibrationRecord(
        delta=0.4, candidates=("full", "cache", "arrow/8", "arrow/16", "arrow/32"), prompts=4, steps=positions,
        sampler="euler", scheduler="simple", cfg=3.5, guidance=None, width=1024, height=768, txt_len=154, seed=7,
        host_version="0.30.0", pack_version="0.1.0", date="2026-11-24T12:00:00Z", wall_time_s=12.5,
    )
    return Plan(model, tuple(pos), cal, "test plan")


def test_round_trip_text_and_file(tmp_path):
    plan = make_plan()
    assert loads_plan(dumps_plan(plan)) == plan
    path = save_plan(plan, tmp_path / "p.json")
    assert load_plan(path) == plan
    # Real JSON, readable by anyone.
    raw = json.loads(path.read_text())
    assert raw["format"] == "dfav2-plan" and raw["version"] == 1
    assert all(len(s) == 5 for p in raw["positions"] for s in p["layers"])


def test_save_is_atomic_and_never_replaces_silently(tmp_path):
    plan = make_plan()
    path = tmp_path / "sub" / "p.json"
    save_plan(plan, path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_plan(make_plan(seed=1), path)
    assert path.read_bytes() == before
    save_plan(make_plan(seed=1), path, overwrite=True)
    assert load_plan(path) == make_plan(seed=1)
    assert [p.name for p in path.parent.iterdir()] == ["p.json"]  # no temp files left


def test_save_leaves_nothing_when_writing_fails(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        save_plan(make_plan(), tmp_path / "p.json")
    assert list(tmp_path.iterdir()) == []


# One malformed example per validated field: (mutation, words the error must contain).
def _set(path, value):
    def mutate(d):
        obj = d
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return mutate


def _del(path):
    def mutate(d):
        obj = d
        for key in path[:-1]:
            obj = obj[key]
        del obj[path[-1]]

    return mutate


MALFORMED = [
    (_set(["format"], "dfa-plan"), "plan.format"),
    (_set(["version"], 2), "plan.version"),
    (_set(["version"], "1"), "plan.version"),
    (_del(["positions"]), "plan.positions"),
    (_set(["surprise"], 1), "plan.surprise: unknown field"),
    (_set(["description"], 5), "plan.description"),
    (_set(["model", "family"], "sdxl"), "plan.model.family"),
    (_set(["model", "layers"], []), "plan.model.layers"),
    (_set(["model", "layers", 0, "heads"], 0), "plan.model.layers[0].heads"),
    (_set(["model", "layers", 0, "heads"], 2.5), "plan.model.layers[0].heads"),
    (_set(["model", "layers", 0, "head_dim"], -64), "plan.model.layers[0].head_dim"),
    (_set(["model", "layers", 0, "name"], None), "plan.model.layers[0].name"),
    (_set(["model", "layers", 1, "name"], "joint.0"), "duplicate layer name"),
    (_set(["model", "layers", 0, "image_only"], "no"), "plan.model.layers[0].image_only"),
    (_set(["calibration", "delta"], -0.1), "plan.calibration.delta"),
    (_set(["calibration", "candidates"], ["arrow/x"]), "plan.calibration.candidates[0]"),
    (_set(["calibration", "prompts"], 0), "plan.calibration.prompts"),
    (_set(["calibration", "steps"], True), "plan.calibration.steps"),
    (_set(["calibration", "sampler"], 3), "plan.calibration.sampler"),
    (_set(["calibration", "scheduler"], "x" * 300), "plan.calibration.scheduler"),
    (_set(["calibration", "cfg"], "high"), "plan.calibration.cfg"),
    (_set(["calibration", "guidance"], [3.5]), "plan.calibration.guidance"),
    (_set(["calibration", "width"], 0), "plan.calibration.width"),
    (_set(["calibration", "height"], 10**12), "plan.calibration.height"),
    (_set(["calibration", "txt_len"], -1), "plan.calibration.txt_len"),
    (_set(["calibration", "seed"], -5), "plan.calibration.seed"),
    (_set(["calibration", "host_version"], {}), "plan.calibration.host_version"),
    (_set(["calibration", "pack_version"], None), "plan.calibration.pack_version"),
    (_set(["calibration", "date"], 20261124), "plan.calibration.date"),
    (_set(["calibration", "wall_time_s"], -3), "plan.calibration.wall_time_s"),
    (_del(["calibration", "seed"]), "plan.calibration.seed: required"),
    (_set(["legend", "ab"], "full"), "plan.legend"),
    (_set(["legend", "Z"], "arrow/0"), "plan.legend.Z"),
    (_set(["legend", "Z"], "full"), "two codes name the same method"),
    (_set(["legend"], []), "plan.legend"),
    (_set(["positions"], []), "plan.positions"),
    (_set(["positions", 0, "sigma"], "1.0"), "plan.positions[0].sigma"),
    (_set(["positions", 2, "sigma"], 1.0), "sigmas must strictly decrease"),
    (_set(["positions", 1, "layers"], ["FFFFF"]), "plan.positions[1].layers: expected 3 layers"),
    (_set(["positions", 1, "layers", 0], "FFFF"), "plan.positions[1].layers[0] (joint.0): expected 5 heads"),
    (_set(["positions", 1, "layers", 0], "FFFFQ"), "code 'Q' is not in plan.legend"),
    (_set(["positions", 1, "layers", 0], ""), "plan.positions[1].layers[0]"),
    (_set(["positions", 0, "layers", 0], "CFFFF"), "first position cannot use 'cache'"),
]


@pytest.mark.parametrize("mutate,words", MALFORMED, ids=[w for _, w in MALFORMED])
def test_each_malformed_field_is_named(mutate, words):
    d = plan_to_dict(make_plan())
    d["legend"] = dict(d["legend"])
    mutate(d)
    with pytest.raises(PlanError) as info:
        loads_plan(json.dumps(d))
    assert words in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text,words",
    [
        ('{"format": NaN}', "NaN is not allowed"),
        ('{"a": Infinity}', "Infinity is not allowed"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"format": "dfav2-plan", ', "not valid JSON"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8"),
        ("null", "plan: expected an object, got null"),
        ('{"format": "dfav2-plan", "version": 1e400}', "out of range"),
    ],
)
def test_hostile_text_is_rejected_with_plan_error(text, words):
    with pytest.raises(PlanError, match=words.replace("(", r"\(").replace(")", r"\)")):
        loads_plan(text)


def test_oversized_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.json"
    with open(path, "wb") as f:
        f.truncate(MAX_PLAN_BYTES + 1)
    with pytest.raises(PlanError, match="larger than"):
        load_plan(path)


# --- property-based fuzzing: anything hostile ends in PlanError, never another exception ----------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=20)
VALID = plan_to_dict(make_plan())


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


ALL_PATHS = [p for p in _paths(VALID) if p]


@st.composite
def hostile_documents(draw):
    kind = draw(st.sampled_from(["mutate", "random", "truncate", "bytes", "deep"]))
    if kind == "mutate":
        d = copy.deepcopy(VALID)
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(ALL_PATHS))
            obj = d
            try:
                for key in path[:-1]:
                    obj = obj[key]
                obj[path[-1]] = draw(json_values)
            except (KeyError, IndexError, TypeError):
                pass
        return json.dumps(d, allow_nan=True)
    if kind == "random":
        return json.dumps(draw(json_values), allow_nan=True)
    text = dumps_plan(make_plan())
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text) - 2))]
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    depth = draw(st.integers(10, 5000))
    return '{"format": ' + "[" * depth + "1" + "]" * depth + "}"


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(hostile_documents())
def test_fuzz_hostile_plans_only_raise_plan_error(doc):
    try:
        plan = loads_plan(doc)
    except PlanError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:  # a mutation may happen to be valid: then it must round-trip
        assert loads_plan(dumps_plan(plan)) == plan


# --- position mapping --------------------------------------------------------------------------------


def test_position_for_sigma_is_nearest():
    plan = make_plan(positions=4)  # sigmas 1.0, 0.75, 0.5, 0.25
    assert [plan.position_for_sigma(s) for s in (2.0, 1.0, 0.9, 0.8, 0.76, 0.625, 0.6, 0.26, 0.0)] == [0, 0, 0, 1, 1, 1, 2, 3, 3]


# --- command line -------------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT), *args], capture_output=True, text=True, timeout=120)


def test_cli_validate_and_inspect(tmp_path):
    path = save_plan(make_plan(), tmp_path / "ok.json")
    r = run_cli("validate", str(path))
    assert r.returncode == 0, r.stderr
    assert "valid plan" in r.stdout
    r = run_cli("inspect", str(path))
    assert r.returncode == 0, r.stderr
    for words in ("sd3 (3 attention layers", "positions: 6", "methods: full", "attention FLOPs kept at 1024x768"):
        assert words in r.stdout


@pytest.mark.parametrize("content", [b"\x00\xff junk", b'{"format": "dfav2-plan", "version": 1}', b"[" * 50_000])
def test_cli_rejects_hostile_plan_with_one_line_and_exit_2(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    r = run_cli("validate", str(path))
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cli_missing_file_exit_2(tmp_path):
    r = run_cli("inspect", str(tmp_path / "nope.json"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


# --- hostile plans, as a hostile user would try them (architecture v2, item 7) ------------------------------


def test_duplicate_keys_are_rejected():
    text = dumps_plan(make_plan()).replace('"version": 1,', '"version": 99, "version": 1,', 1)
    with pytest.raises(PlanError, match='duplicate key "version"'):
        loads_plan(text)
    d = plan_to_dict(make_plan())
    legend_dup = json.dumps(d).replace('"legend": {', '"legend": {"F": "cache", ', 1)
    with pytest.raises(PlanError, match="duplicate key"):
        loads_plan(legend_dup)


def test_non_ascii_digits_in_a_method_factor_are_rejected():
    d = plan_to_dict(make_plan())
    d["legend"] = {**d["legend"], "Z": "arrow/\u0661"}  # ARABIC-INDIC DIGIT ONE
    with pytest.raises(PlanError, match="plan.legend.Z"):
        loads_plan(json.dumps(d))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_named_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "x.json"
    os.mkfifo(fifo)
    with pytest.raises(PlanError, match="not a regular file"):
        load_plan(fifo)


def test_unencodable_and_control_text_is_sanitised():
    d = plan_to_dict(make_plan())
    d["description"] = "evil \ud800 text \x1b[31m red"
    plan = loads_plan(json.dumps(d))
    assert plan.description == "evil \ufffd text \ufffd[31m red"
    plan.description.encode("utf-8")
    from dfav2.calibration.cli import summarize

    summarize(plan).encode("utf-8")
    assert Plan(plan.model, plan.positions, None, "a\udfffb").description == "a\ufffdb"


def test_weights_fingerprint_round_trips_and_is_optional():
    import dataclasses

    plan = make_plan()
    assert "weights" not in dumps_plan(plan)  # not recorded: files stay readable by older packs
    marked = Plan(plan.model, plan.positions, dataclasses.replace(plan.calibration, weights="w1:0123abcd"), "x")
    assert loads_plan(dumps_plan(marked)).calibration.weights == "w1:0123abcd"


def test_conditioning_fingerprint_round_trips_and_is_optional():
    import dataclasses

    plan = make_plan()
    assert "conditioning" not in dumps_plan(plan)
    marked = Plan(plan.model, plan.positions, dataclasses.replace(plan.calibration, conditioning="c1:0123abcd"), "x")
    assert loads_plan(dumps_plan(marked)).calibration.conditioning == "c1:0123abcd"
    with pytest.raises(PlanError, match="calibration.conditioning: expected a string"):
        loads_plan(dumps_plan(marked).replace('"c1:0123abcd"', "5"))


def test_settings_differences_name_each_changed_field():
    import dataclasses

    from dfav2.calibration.plan import SETTINGS_FIELDS, describe_settings, settings_differences

    rng = random.Random(3)
    cal = dataclasses.replace(make_plan().calibration, weights="w1:aa", conditioning="c1:bb")
    same = cal.settings()
    assert set(same) == set(SETTINGS_FIELDS) and settings_differences(cal, same) == []
    # provenance never counts; a float that went through a widget and JSON still matches
    assert settings_differences(dataclasses.replace(cal, date="x", host_version="9", wall_time_s=1.0, txt_len=3),
                                dict(same, delta=0.1 + 0.3, cfg=3.5000000000000004)) == []
    changes = {"delta": 0.2, "candidates": ("full", "cache"), "prompts": 5, "steps": 28, "sampler": "heun",
               "scheduler": "beta", "cfg": 1.0, "guidance": 3.5, "width": 512, "height": 512, "seed": 8,
               "weights": "w1:other", "conditioning": None, "fp8_cost_factor": 0.5}
    assert set(changes) == set(SETTINGS_FIELDS)
    for _ in range(20):
        picked = rng.sample(sorted(changes), rng.randint(1, len(changes)))
        diff = settings_differences(cal, dict(same, **{k: changes[k] for k in picked}))
        assert [d[0] for d in diff] == [k for k in SETTINGS_FIELDS if k in picked]
    (name, mine, now), = settings_differences(cal, dict(same, conditioning=None))
    assert (name, mine, now) == ("conditioning", "c1:bb", "none")
    assert settings_differences(cal, dict(same, delta=0.5)) == [("delta", "0.4", "0.5")]
    with pytest.raises(KeyError, match="seed"):
        settings_differences(cal, {k: v for k, v in same.items() if k != "seed"})
    text = cal.describe()
    assert "delta 0.4" in text and "candidates full/cache/arrow/8/arrow/16/arrow/32" in text and "guidance none" in text
    assert describe_settings({"steps": 4, "guidance": None}) == "steps 4, guidance none"


def _cap_sized_plan_text(positions: int) -> str:
    rng = random.Random(0)
    layers = [{"name": f"double.{i}", "heads": 24, "head_dim": 128} for i in range(19)]
    layers += [{"name": f"single.{i}", "heads": 24, "head_dim": 128} for i in range(38)]
    legend = {"F": "full", "C": "cache", "a": "arrow/8", "b": "arrow/16", "c": "arrow/32"}
    pos = [{"sigma": 1.0 - p / positions,
            "layers": ["".join(rng.choice("FCabc" if p else "Fabc") for _ in range(24)) for _ in layers]}
           for p in range(positions)]
    return json.dumps({"format": "dfav2-plan", "version": 1, "description": "cap", "model": {"family": "flux",
                       "layers": layers}, "calibration": None, "legend": legend, "positions": pos}, separators=(",", ":"))


def test_cap_sized_plan_loads_fast_and_decodes_lazily():
    import time

    text = _cap_sized_plan_text(9_700)  # ~15.3 MB, every layer decision distinct
    assert 15_000_000 < len(text) <= MAX_PLAN_BYTES
    t0 = time.perf_counter()
    plan = loads_plan(text)
    took = time.perf_counter() - t0
    assert took < 5.0, took  # ~0.4 s on an idle 2-core CPU (was 15-33 s); generous for a loaded CI machine
    raw = json.loads(text)
    assert "".join(m.name[0] for m in plan.decision(500, 3).methods) == raw["positions"][500]["layers"][3].translate(
        str.maketrans({"F": "f", "C": "c", "a": "a", "b": "a", "c": "a"}))
    counts = plan.method_counts()
    assert sum(counts.values()) == 9_700 * 57 * 24
    assert counts["cache"] == sum(s.count("C") for p in raw["positions"] for s in p["layers"])
