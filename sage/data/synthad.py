"""SynthAD: a generated industrial anomaly-reasoning benchmark in the AD-PL JSONL format
(DESIGN §6-7), so that the whole SAGE pipeline runs offline on a CPU.

Products (8 categories, 3 colour variants each, two sizes) are drawn with Pillow on a lit,
noisy background; an anomalous test image carries one defect at one of 9 regions:
scratch, hole, crack, stain, colour deviation (the object is drawn in another variant's
colour: abnormal only relative to the reference) or a missing component. Every test image has
a normal reference: another instance of the same variant on the same inspection station, with
small pose and lighting jitter.
Half of the pairs are anomalous, and no question template can be answered from its wording
alone (label balance, P_TRUE below).

Each test/reference pair gets a group of 5 questions of one level (standard comparison ~44%,
defect identification ~37%, deep diagnosis ~19%, as in AD-PL), each with 4 ranked answers:
  A1 right decision + right defect type + right region + sound reasoning
  A2 right decision, vague or wrong detail
  A3 hedged decision with faulty reasoning
  A4 wrong decision
plus structured truth (for the oracle judge, sage.data.oracle) and per-image fact sentences
(one per prompt of sage.data.prompts.FACT_PROMPTS, from category knowledge).

Splits: pretrain (captions, general questions and fact prompts on normal images of every
category; no anomaly QA), sfe_train, edpo_train, test_seen (seen categories), test_unseen
(the UNSEEN categories only), corpus.txt (all text, for the tiny tokenizer), facts.jsonl,
manifest.json.

    generate("data/synthad", seed=0)   # or: python -m sage.tools.synthad --out data/synthad
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sage.data.prompts import FACT_PROMPTS

REGIONS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom",
           "bottom-right")  # 3 x 3 grid over the image, raster order
DEFECTS = ("scratch", "hole", "crack", "stain", "colour deviation", "missing component")
LEVELS = ("standard", "identification", "diagnosis")
LEVEL_WEIGHTS = (0.44, 0.37, 0.19)
# Label balance: no question template may be answerable from its wording alone. Half the
# pairs are anomalous; a type / region / cause question names the true one with P_TRUE.
# Measured on the default seed: majority label per template answers 57% of test_unseen
# (was 72% before the balance), so accuracy above that needs the images.
P_TRUE = 0.7
# A photo places the object with up to POSE_JITTER of the image as offset and scales /
# brightens it by up to SCALE_ / LIGHT_JITTER. Test and reference are two shots on one
# inspection station (same bench and pose up to SHOT_JITTER, as in MVTec AD): with
# independent shots, pose and lighting moved 14 px patches as much as a scratch does: the
# largest aligned 14 px pixel difference told anomalous from normal pairs (scratch, hole,
# crack, stain) with AUROC 0.60; with shared stations 0.85 (about 130 pairs each).
POSE_JITTER, SCALE_JITTER, LIGHT_JITTER = 0.03, 0.04, 0.1
SHOT_JITTER = 0.01
# A general VLM describes surface marks it sees (InternVL2 does): half the pretrain shots
# carry one of these, named in the caption; the anomaly splits' images are untouched.
SURFACE_MARKS = ("scratch", "hole", "crack", "stain")
P_MARK = 0.5
UNSEEN = ("nut", "cable")  # evaluation-only categories (paper protocol: unseen categories)

CONSEQUENCE = {
    "scratch": "a scratch breaks the surface finish and can grow into a crack under load",
    "hole": "a hole lets dirt and moisture in and weakens the part",
    "crack": "a crack can spread and make the part break in use",
    "stain": "a stain shows contamination from the process and fails the visual check",
    "colour deviation": "the colour does not match the reference variant, so the wrong "
                        "material or coating was used",
    "missing component": "a missing component means the part cannot work as designed",
}
CAUSE = {"scratch": "rough handling", "hole": "a punching fault", "crack": "stress in the material",
         "stain": "oil contamination", "colour deviation": "a wrong coating batch",
         "missing component": "an assembly error"}


@dataclass(frozen=True)
class Category:
    name: str
    shape: str  # drawing routine
    description: str  # what a normal one looks like
    components: tuple[tuple[str, str], ...]  # (component, region)
    typical: tuple[str, ...]  # defects it tends to exhibit
    variants: tuple[tuple[str, tuple[int, int, int]], ...]  # (colour name, RGB)


CATEGORIES = (
    Category("washer", "ring", "a flat round ring with a centred hole", (("inner edge", "center"),),
             ("scratch", "crack", "stain"), (("silver", (185, 188, 195)), ("brass", (190, 150, 70)),
                                            ("black", (60, 60, 66)))),
    Category("capsule", "capsule", "a smooth two-part capsule with a printed band",
             (("band", "center"),), ("stain", "crack", "colour deviation"),
             (("red", (200, 60, 60)), ("white", (235, 235, 230)), ("blue", (70, 100, 200)))),
    Category("pcb", "board", "a green board with a chip and two pads",
             (("chip", "center"), ("left pad", "left"), ("right pad", "right")),
             ("missing component", "scratch", "stain"),
             (("green", (40, 140, 70)), ("blue", (40, 80, 160)), ("black", (40, 40, 40)))),
    Category("screw", "screw", "a screw with a round head and a threaded shank",
             (("head", "top"), ("tip", "bottom")), ("scratch", "crack", "missing component"),
             (("steel", (170, 172, 180)), ("gold", (205, 170, 60)), ("black", (55, 55, 60)))),
    Category("tile", "tile", "a square tile with an even glaze and a centre mark",
             (("centre mark", "center"),), ("crack", "stain", "colour deviation"),
             (("white", (230, 230, 222)), ("terracotta", (190, 100, 60)), ("grey", (130, 130, 135)))),
    Category("bottle", "bottle", "an upright bottle with a cap and a label",
             (("cap", "top"), ("label", "center")), ("hole", "stain", "missing component"),
             (("green", (60, 150, 90)), ("brown", (130, 80, 40)), ("clear", (200, 215, 220)))),
    Category("nut", "hexagon", "a hexagonal nut with a threaded centre hole",
             (("thread", "center"),), ("scratch", "crack", "hole"),
             (("steel", (165, 168, 175)), ("brass", (190, 150, 70)), ("black", (50, 50, 55)))),
    Category("cable", "cable", "a cable cross-section with three coloured wires",
             (("top wire", "top"), ("left wire", "bottom-left"), ("right wire", "bottom-right")),
             ("missing component", "scratch", "colour deviation"),
             (("grey", (150, 150, 150)), ("black", (45, 45, 45)), ("white", (225, 225, 220)))),
)
BY_NAME = {c.name: c for c in CATEGORIES}
WIRE_COLOURS = ((200, 50, 40), (50, 160, 60), (40, 80, 200))


# ----------------------------------------------------------------------------- drawing

def region_box(region: str, size: int) -> tuple[float, float, float, float]:
    """Pixel box (x0, y0, x1, y1) of one of the 9 named regions (3 x 3 grid)."""
    r, c = divmod(REGIONS.index(region), 3)
    s = size / 3
    return c * s, r * s, (c + 1) * s, (r + 1) * s


def region_point(region: str, size: int, rng: np.random.Generator) -> tuple[float, float]:
    """A point well inside the region, pulled towards the centre so it lies on the object."""
    x0, y0, x1, y1 = region_box(region, size)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    mid = size / 2
    jit = size / 18
    return (cx + 0.4 * (mid - cx) + rng.uniform(-jit, jit),
            cy + 0.4 * (mid - cy) + rng.uniform(-jit, jit))


def background(size: int, rng: np.random.Generator, bench: tuple[float, float] | None = None
               ) -> Image.Image:
    """Grey bench with a lighting gradient and sensor noise; bench = (brightness, light angle)
    of a fixture shared by several shots (each shot varies the brightness by +-3)."""
    if bench is None:
        base, ang = rng.uniform(95, 125), rng.uniform(0, 2 * math.pi)
    else:
        base, ang = bench[0] + rng.uniform(-3, 3), bench[1]
    yy, xx = np.mgrid[0:size, 0:size] / size
    light = base + 25 * (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5))
    img = light[..., None] + rng.normal(0, 3, (size, size, 1))
    return Image.fromarray(np.clip(np.repeat(img, 3, -1), 0, 255).astype(np.uint8))


def shade(rgb, k: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, v * k))) for v in rgb)


def draw_object(img: Image.Image, cat: Category, rgb, scale: float, offset, missing: str | None,
                bright: float) -> None:
    """Draw one product centred (plus offset) at `scale` of the image; skip `missing`."""
    d = ImageDraw.Draw(img)
    S = img.size[0]
    cx, cy = S / 2 + offset[0], S / 2 + offset[1]
    R = 0.40 * S * scale
    col, dark = shade(rgb, bright), shade(rgb, 0.6 * bright)
    bg = img.getpixel((2, 2))
    comps = [n for n, _ in cat.components if n != missing]
    if cat.shape == "ring":
        d.ellipse([cx - R, cy - R, cx + R, cy + R], fill=col, outline=dark, width=3)
        r = 0.28 * R
        if "inner edge" in comps:
            d.ellipse([cx - r - 4, cy - r - 4, cx + r + 4, cy + r + 4], outline=dark, width=4)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=bg)
    elif cat.shape == "hexagon":
        pts = [(cx + R * math.cos(math.pi / 3 * k), cy + R * math.sin(math.pi / 3 * k))
               for k in range(6)]
        d.polygon(pts, fill=col, outline=dark)
        r = 0.3 * R
        if "thread" in comps:
            d.ellipse([cx - r - 5, cy - r - 5, cx + r + 5, cy + r + 5], outline=dark, width=4)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=bg)
    elif cat.shape == "capsule":
        w = 0.55 * R
        d.rounded_rectangle([cx - w, cy - R, cx + w, cy + R], radius=int(w), fill=col,
                            outline=dark, width=3)
        if "band" in comps:
            d.rectangle([cx - w, cy - 0.12 * R, cx + w, cy + 0.12 * R], fill=dark)
    elif cat.shape == "board":
        d.rectangle([cx - R, cy - 0.8 * R, cx + R, cy + 0.8 * R], fill=col, outline=dark, width=3)
        if "chip" in comps:
            d.rectangle([cx - 0.3 * R, cy - 0.3 * R, cx + 0.3 * R, cy + 0.3 * R], fill=(25, 25, 25))
        for name, x in (("left pad", cx - 0.75 * R), ("right pad", cx + 0.75 * R)):
            if name in comps:
                d.rectangle([x - 0.12 * R, cy - 0.2 * R, x + 0.12 * R, cy + 0.2 * R],
                            fill=(210, 180, 60))
    elif cat.shape == "screw":
        if "head" in comps:
            d.ellipse([cx - 0.6 * R, cy - R, cx + 0.6 * R, cy - 0.35 * R], fill=col, outline=dark,
                      width=3)
            d.line([cx - 0.35 * R, cy - 0.68 * R, cx + 0.35 * R, cy - 0.68 * R], fill=dark,
                   width=5)
        d.rectangle([cx - 0.22 * R, cy - 0.45 * R, cx + 0.22 * R, cy + 0.7 * R], fill=col,
                    outline=dark)
        for k in range(6):
            y = cy - 0.35 * R + k * 0.18 * R
            d.line([cx - 0.22 * R, y, cx + 0.22 * R, y + 0.08 * R], fill=dark, width=2)
        if "tip" in comps:
            d.polygon([(cx - 0.22 * R, cy + 0.7 * R), (cx + 0.22 * R, cy + 0.7 * R),
                       (cx, cy + R)], fill=col, outline=dark)
    elif cat.shape == "tile":
        d.rectangle([cx - R, cy - R, cx + R, cy + R], fill=col, outline=dark, width=4)
        if "centre mark" in comps:
            d.ellipse([cx - 0.15 * R, cy - 0.15 * R, cx + 0.15 * R, cy + 0.15 * R], fill=dark)
    elif cat.shape == "bottle":
        d.rounded_rectangle([cx - 0.5 * R, cy - 0.55 * R, cx + 0.5 * R, cy + R], radius=12,
                            fill=col, outline=dark, width=3)
        d.rectangle([cx - 0.2 * R, cy - 0.85 * R, cx + 0.2 * R, cy - 0.55 * R], fill=col,
                    outline=dark)
        if "cap" in comps:
            d.rectangle([cx - 0.25 * R, cy - R, cx + 0.25 * R, cy - 0.82 * R], fill=(200, 40, 40))
        if "label" in comps:
            d.rectangle([cx - 0.5 * R, cy - 0.1 * R, cx + 0.5 * R, cy + 0.35 * R],
                        fill=(240, 240, 235))
    elif cat.shape == "cable":
        d.ellipse([cx - R, cy - R, cx + R, cy + R], fill=col, outline=dark, width=4)
        r = 0.3 * R
        for (name, _), (ang, wcol) in zip(cat.components, zip((-90, 150, 30), WIRE_COLOURS)):
            if name in comps:
                x = cx + 0.5 * R * math.cos(math.radians(ang))
                y = cy + 0.5 * R * math.sin(math.radians(ang))
                d.ellipse([x - r, y - r, x + r, y + r], fill=wcol, outline=(20, 20, 20), width=2)
    else:  # pragma: no cover - the table above lists every shape
        raise ValueError(f"unknown shape {cat.shape!r}")


def draw_defect(img: Image.Image, defect: str, region: str, rng: np.random.Generator) -> None:
    """Scratch / hole / crack / stain at `region` (colour and missing part are drawn by the
    object itself)."""
    S = img.size[0]
    x, y = region_point(region, S, rng)
    d = ImageDraw.Draw(img)
    u = S / 224  # sizes below are for 224 px images
    if defect == "scratch":
        ang = rng.uniform(0, math.pi)
        L = rng.uniform(26, 36) * u
        dx, dy = L * math.cos(ang) / 2, L * math.sin(ang) / 2
        d.line([x - dx, y - dy, x + dx, y + dy], fill=(245, 245, 245), width=max(1, int(4 * u)))
        d.line([x - dx + 3 * u, y - dy + 3 * u, x + dx + 3 * u, y + dy + 3 * u],
               fill=(30, 30, 30), width=max(1, int(3 * u)))
    elif defect == "hole":
        r = rng.uniform(8, 11) * u
        d.ellipse([x - r, y - r, x + r, y + r], fill=(15, 15, 15), outline=(60, 60, 60))
    elif defect == "crack":
        pts, ang = [(x, y)], rng.uniform(0, 2 * math.pi)
        for _ in range(5):
            ang += rng.uniform(-0.9, 0.9)
            px, py = pts[-1]
            pts.append((px + 7 * u * math.cos(ang), py + 7 * u * math.sin(ang)))
        shift = (pts[0][0] - pts[len(pts) // 2][0], pts[0][1] - pts[len(pts) // 2][1])
        d.line([(px + shift[0], py + shift[1]) for px, py in pts], fill=(10, 10, 10),
               width=max(1, int(4 * u)))
    elif defect == "stain":
        layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
        ld = ImageDraw.Draw(layer)
        for _ in range(4):
            ox, oy, r = rng.uniform(-6, 6) * u, rng.uniform(-6, 6) * u, rng.uniform(7, 11) * u
            ld.ellipse([x + ox - r, y + oy - r, x + ox + r, y + oy + r], fill=(110, 70, 20, 170))
        img.paste(Image.alpha_composite(img.convert("RGBA"), layer.filter(
            ImageFilter.GaussianBlur(1.5))).convert("RGB"))


def render(cat: Category, variant: int, size: int, rng: np.random.Generator, scale: float,
           defect: str | None = None, region: str | None = None,
           missing: str | None = None, colour_variant: int | None = None,
           fixture: dict | None = None, defect_rng: np.random.Generator | None = None
           ) -> Image.Image:
    """One product photo: pose / lighting jitter, optional defect. `fixture` (from
    `fixture()`) places several shots on one bench and pose, each with the small SHOT_JITTER.
    `defect_rng` draws the defect's shape instead of `rng` (the pretrain split's marks, so
    that `rng` makes the same draws with and without them)."""
    rgb = cat.variants[variant if colour_variant is None else colour_variant][1]
    if fixture is None:  # a single shot; its draw order keeps the pretrain split unchanged
        img = background(size, rng)
        offset = rng.uniform(-POSE_JITTER, POSE_JITTER, 2) * size
        scale *= rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER)
        bright = rng.uniform(1 - LIGHT_JITTER, 1 + LIGHT_JITTER)
    else:
        j = SHOT_JITTER
        img = background(size, rng, fixture["bench"])
        offset = fixture["offset"] + rng.uniform(-j, j, 2) * size
        scale *= fixture["scale"] * rng.uniform(1 - j, 1 + j)
        bright = fixture["bright"] * rng.uniform(1 - 3 * j, 1 + 3 * j)
    draw_object(img, cat, rgb, scale, offset, missing, bright=bright)
    if defect in ("scratch", "hole", "crack", "stain"):
        draw_defect(img, defect, region, rng if defect_rng is None else defect_rng)
    return img.filter(ImageFilter.GaussianBlur(0.5))


def fixture(size: int, rng: np.random.Generator) -> dict:
    """One inspection station: bench lighting and the part's pose, shared by test and reference."""
    return {"bench": (rng.uniform(95, 125), rng.uniform(0, 2 * math.pi)),
            "offset": rng.uniform(-POSE_JITTER, POSE_JITTER, 2) * size,
            "scale": rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER),
            "bright": rng.uniform(1 - LIGHT_JITTER, 1 + LIGHT_JITTER)}


# ----------------------------------------------------------------------------- text

def facts_for(cat: Category, variant: int) -> list[str]:
    """One sentence per prompt of FACT_PROMPTS (category knowledge + the image's variant)."""
    comps = " and ".join(n for n, _ in cat.components)
    return [f"A {cat.name} tends to show {', '.join(cat.typical[:-1])} or {cat.typical[-1]}.",
            f"A normal {cat.name} is {cat.description}.",
            f"The {comps} of a {cat.name} matter most in inspection.",
            f"This {cat.name} is the {cat.variants[variant][0]} variant."]


def other(rng: np.random.Generator, options, exclude):
    choices = [o for o in options if o != exclude]
    return choices[int(rng.integers(len(choices)))]


def finding(t: dict, cat: str) -> str:
    """The A1 explanation of what is (not) there."""
    if not t["anomalous"]:
        return f"the {cat} matches the normal reference and is free of defects"
    where = f"at the {t['region']}"
    if t["defect"] == "colour deviation":
        return (f"the {cat} is {t['colour']} while the reference is {t['reference_colour']}, a "
                f"colour deviation over the whole part")
    if t["defect"] == "missing component":
        return f"the {t['component']} is missing {where} of the {cat}, a missing component"
    return f"there is a {t['defect']} {where} of the {cat}"


def decide(label: str) -> str:
    """The closing sentence that states the decision: answers give the evidence first."""
    return f"So the answer is {'Yes' if label == 'yes' else 'No'}."


def answers_for(label: str, t: dict, cat: str, rng: np.random.Generator) -> list[str]:
    """4 ranked answers (A1 > A2 > A3 > A4) for a question whose truth is `label`.

    Each states what the inspection shows and then the decision (`decide`): a model that
    must say Yes/No first has to see the part, read the question's polarity and combine the
    two in one step, which the tiny model never learnt (README, "Why the evidence comes
    first"); with the evidence first the Yes/No follows from text already written."""
    wrong = "no" if label == "yes" else "yes"
    why = (CONSEQUENCE[t["defect"]] if t["anomalous"]
           else "so the part is fit for use and can pass inspection")
    a1 = f"The inspection shows that {finding(t, cat)}; {why}. {decide(label)}"
    if t["anomalous"]:
        fake = other(rng, [d for d in DEFECTS if d not in ("colour deviation", "missing component")],
                     t["defect"])
        a2 = (f"There is a {fake} at the {other(rng, REGIONS, t['region'])} of the {cat}. "
              f"{decide(label)}")
        a4 = f"The {cat} looks normal and matches the reference. {decide(wrong)}"
    else:
        a2 = f"The {cat} seems fine overall. {decide(label)}"
        fake = DEFECTS[int(rng.integers(4))]
        a4 = (f"There is a {fake} at the {REGIONS[int(rng.integers(9))]} of the {cat}. "
              f"{decide(wrong)}")
    a3 = (f"Maybe, it is hard to tell from this image whether the {cat} is defective. "
          f"{decide(label)}")
    return [a1, a2, a3, a4]


def questions_for(level: str, t: dict, cat: Category, rng: np.random.Generator):
    """Five (question, label) pairs of one level about one test/reference pair."""
    n, anom, dfc = cat.name, t["anomalous"], t["defect"]
    yn = lambda b: "yes" if b else "no"  # noqa: E731
    if level == "standard":
        return [(f"Is there any anomaly in the test {n} compared with the reference?", yn(anom)),
                (f"Does the test {n} look the same as the normal reference?", yn(not anom)),
                (f"Is the test {n} defective?", yn(anom)),
                (f"Does the test {n} show any difference from the reference?", yn(anom)),
                (f"Should the test {n} pass the quality inspection?", yn(not anom))]
    if level == "identification":
        qs = []
        for _ in range(3):
            ask = dfc if (anom and rng.random() < P_TRUE) else other(rng, DEFECTS, dfc)
            qs.append((f"Is there a {ask} on the {n}?", yn(anom and ask == dfc)))
        reg = (t["region"] if (anom and rng.random() < P_TRUE)
               else other(rng, REGIONS, t["region"]))
        qs.append((f"Is there a defect at the {reg} of the {n}?",
                   yn(anom and reg == t["region"])))
        qs.append((f"Is the {n} free of defects?", yn(not anom)))
        return qs
    cause = (CAUSE[dfc] if (anom and rng.random() < P_TRUE)
             else CAUSE[other(rng, DEFECTS, dfc)])
    return [(f"Would this {n} work reliably in use?", yn(not anom)),
            (f"Could a defect on this {n} cause it to fail?", yn(anom)),
            (f"Does this {n} need rework or rejection?", yn(anom)),
            (f"Could the condition of this {n} come from {cause}?",
             yn(anom and cause == CAUSE[dfc])),
            (f"Is it safe to ship this {n} to a customer?", yn(not anom))]


# ----------------------------------------------------------------------------- generation

def sample_pair(cat: Category, rng: np.random.Generator, size: int, anomalous: bool):
    """-> (test image, reference image, truth)."""
    v = int(rng.integers(len(cat.variants)))
    scale = float(rng.choice([0.9, 1.0]))
    truth = {"anomalous": anomalous, "defect": None, "region": None,
             "variant": cat.variants[v][0], "reference_variant": cat.variants[v][0],
             "colour": cat.variants[v][0], "reference_colour": cat.variants[v][0],
             "component": None}
    kw = {}
    if anomalous:
        defect = DEFECTS[int(rng.integers(len(DEFECTS)))]
        truth["defect"] = defect
        if defect == "missing component":
            comp, region = cat.components[int(rng.integers(len(cat.components)))]
            truth.update(component=comp, region=region)
            kw["missing"] = comp
        elif defect == "colour deviation":
            cv = (v + 1 + int(rng.integers(len(cat.variants) - 1))) % len(cat.variants)
            truth.update(region="center", colour=cat.variants[cv][0], variant=cat.variants[cv][0])
            kw["colour_variant"] = cv
        else:
            truth["region"] = REGIONS[int(rng.integers(9))]
            kw.update(defect=defect, region=truth["region"])
    station = fixture(size, rng)
    test = render(cat, v, size, rng, scale, fixture=station, **kw)
    ref = render(cat, v, size, rng, scale, fixture=station)
    return test, ref, truth


def make_groups(split: str, cats: list[Category], n_groups: int, out: Path, size: int,
                rng: np.random.Generator, p_anomalous: float = 0.5) -> list[dict]:
    """n_groups test/reference pairs, 5 QA records each."""
    records = []
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    n_anom = int(round(p_anomalous * n_groups))
    anomalous = rng.permutation([True] * n_anom + [False] * (n_groups - n_anom))
    for g in range(n_groups):
        cat = cats[g % len(cats)]
        test, ref, truth = sample_pair(cat, rng, size, bool(anomalous[g]))
        gid = f"synth-{split}-{cat.name}-{g:05d}"
        test.save(img_dir / f"{gid}.png")
        ref.save(img_dir / f"{gid}_ref.png")
        level = LEVELS[int(rng.choice(3, p=LEVEL_WEIGHTS))]
        facts = facts_for(cat, cat.variants.index(next(
            x for x in cat.variants if x[0] == truth["reference_variant"])))
        for q, (question, label) in enumerate(questions_for(level, truth, cat, rng)):
            records.append({
                "id": f"{gid}-q{q}", "test_image": f"images/{split}/{gid}.png",
                "reference_image": f"images/{split}/{gid}_ref.png", "category": cat.name,
                "source": "synthad", "level": level, "group": gid, "question": question,
                "answers": answers_for(label, truth, cat.name, rng), "label": label,
                "facts": facts,
                "truth": {k: truth[k] for k in ("anomalous", "defect", "region", "variant",
                                                "reference_variant")}})
    return records


def yes_no_questions(cat: Category, colour: str, rng: np.random.Generator
                     ) -> list[tuple[str, str, str]]:
    """Two general Yes/No questions about what the image shows (which object, which colour),
    each asked in a positive or a negated form about the true or another value, so that
    "Yes" and "No" are equally likely and the answer needs both the image and the wording.
    A real VLM brings this skill to the anomaly task; without it SFE must learn the
    question's polarity and the image at once (README, "Why the evidence comes first").
    -> [(question, answer, label)]."""
    others = [c for c in CATEGORIES if c.name != cat.name]
    asked = []
    for kind in ("object", "colour"):
        true = bool(rng.random() < 0.5)
        negated = bool(rng.random() < 0.5)
        if kind == "object":
            name = cat.name if true else others[int(rng.integers(len(others)))].name
            q = (f"Is the object something other than a {name}?" if negated
                 else f"Is this a {name}?")
            fact = f"It is a {cat.name}" + ("." if true else f", not a {name}.")
        else:
            wrong = [c for c, _ in cat.variants if c != colour]
            c = colour if true else wrong[int(rng.integers(len(wrong)))]
            q = (f"Is the {cat.name} a colour other than {c}?" if negated
                 else f"Is the {cat.name} {c}?")
            fact = f"The {cat.name} is {colour}" + ("." if true else f", not {c}.")
        label = "yes" if true != negated else "no"
        asked.append((q, f"{fact} {decide(label)}", label))
    return asked


def surface_mark(cat: Category, rng: np.random.Generator) -> tuple[str | None, str | None, str]:
    """-> (mark, region, sentence): half the pretrain shots carry a surface mark, described
    the way a general VLM describes what it sees (no reference, no verdict, no anomaly)."""
    if rng.random() >= P_MARK:
        return None, None, f"The surface of the {cat.name} is clean."
    mark = SURFACE_MARKS[int(rng.integers(len(SURFACE_MARKS)))]
    region = REGIONS[int(rng.integers(len(REGIONS)))]
    return mark, region, f"The {cat.name} has a {mark} at the {region}."


def make_pretrain(cats: list[Category], n_images: int, out: Path, size: int,
                  rng: np.random.Generator, yn_rng: np.random.Generator,
                  mark_rng: np.random.Generator) -> list[dict]:
    """Captions, general questions and fact prompts: no anomaly QA.

    `yn_rng` draws the Yes/No questions (`yes_no_questions`) and `mark_rng` the surface marks
    (`surface_mark`: which, where, and their shapes) apart from `rng`, so adding them left
    every other split as it was."""
    records = []
    img_dir = out / "images" / "pretrain"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        cat = cats[i % len(cats)]
        v = int(rng.integers(len(cat.variants)))
        colour = cat.variants[v][0]
        rel = f"images/pretrain/{cat.name}-{i:05d}.png"
        mark, where, seen = surface_mark(cat, mark_rng)
        render(cat, v, size, rng, float(rng.choice([0.9, 1.0])), defect=mark, region=where,
               defect_rng=mark_rng).save(out / rel)
        comp, region = cat.components[int(rng.integers(len(cat.components)))]
        qa = [("Describe the image.", f"A {colour} {cat.name} on a grey bench. It is "
                                      f"{cat.description}. {seen}"),
              ("What object is shown in the image?", f"It is a {cat.name}."),
              (f"What colour is the {cat.name}?", f"The {cat.name} is {colour}."),
              (f"Where is the {comp} of the {cat.name}?", f"The {comp} is at the {region}.")]
        qa += list(zip(FACT_PROMPTS, facts_for(cat, v)))
        for k in rng.choice(len(qa), size=3, replace=False):
            q, a = qa[int(k)]
            rid = f"synth-pretrain-{i:05d}-q{int(k)}"
            records.append({"id": rid, "test_image": rel, "reference_image": None,
                            "category": cat.name, "source": "synthad", "level": "general",
                            "group": rid, "question": q, "answers": [a], "label": None})
        rid = f"synth-pretrain-{i:05d}-surface"
        records.append({"id": rid, "test_image": rel, "reference_image": None,
                        "category": cat.name, "source": "synthad", "level": "general",
                        "group": rid, "question": f"Describe the surface of the {cat.name}.",
                        "answers": [seen], "label": None})
        for k, (q, a, label) in enumerate(yes_no_questions(cat, colour, yn_rng)):
            rid = f"synth-pretrain-{i:05d}-yn{k}"
            records.append({"id": rid, "test_image": rel, "reference_image": None,
                            "category": cat.name, "source": "synthad", "level": "general",
                            "group": rid, "question": q, "answers": [a], "label": label})
    return records


def write_jsonl(records: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


SIZES = {"pretrain": 700, "sfe_train": 300, "edpo_train": 100, "test_seen": 40,
         "test_unseen": 40}  # images (pretrain) or groups of 5 questions, at scale 1


def generate(out: str | Path, seed: int = 0, size: int = 224, scale: float = 1.0) -> dict:
    """Write every split into `out`; -> the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    seen = [c for c in CATEGORIES if c.name not in UNSEEN]
    unseen = [c for c in CATEGORIES if c.name in UNSEEN]
    n = {k: max(len(CATEGORIES), int(round(v * scale))) for k, v in SIZES.items()}
    splits = {"pretrain": make_pretrain(list(CATEGORIES), n["pretrain"], out, size, rng,
                                        np.random.default_rng([seed, 1]),
                                        np.random.default_rng([seed, 2]))}
    for split, cats in (("sfe_train", seen), ("edpo_train", seen), ("test_seen", seen),
                        ("test_unseen", unseen)):
        splits[split] = make_groups(split, cats, n[split], out, size, rng)
    for split, recs in splits.items():
        write_jsonl(recs, out / f"{split}.jsonl")
    texts = set()
    for recs in splits.values():
        for r in recs:
            texts.update([r["question"], *r["answers"], *(r.get("facts") or [])])
    (out / "corpus.txt").write_text("\n".join(sorted(texts)) + "\n")
    facts = {r["test_image"]: r["facts"] for k, recs in splits.items() if k != "pretrain"
             for r in recs}
    write_jsonl([{"test_image": k, "facts": v, "source": "synthad"} for k, v in facts.items()],
                out / "facts.jsonl")
    manifest = {"seed": seed, "size": size, "scale": scale,
                "categories": {"seen": [c.name for c in seen], "unseen": [c.name for c in unseen]},
                "counts": {k: len(v) for k, v in splits.items()}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
