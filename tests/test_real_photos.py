"""Real photographs in the MVTec AD layout, end to end (docs/experiments.md, "Real photographs
(MVTec AD layout)"): a tiny folder of odd-sized grayscale / RGB / RGBA / 16-bit images is
converted with a held-out split, facts come from the committed tiny base, SFE trains 2 steps on
one part and evaluate.py scores the other, with the "Always normal" reference row. Also: images
of any mode and size, and undecodable images named. About 30 s on 2 busy cores.
Run: python -m pytest -q tests/test_real_photos.py"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sage.data.images import load_image, open_rgb
from sage.data.schema import load_jsonl

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "weights" / "sage-tiny-base"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# category: (size, mode of most images, {test folder: number of images})
CATEGORIES = {
    "metal_plate": ((97, 61), "L", {"good": 2, "scratch": 2, "oil_spot": 3}),
    "capsule": ((333, 271), "RGB", {"good": 3, "crack": 2, "faulty_imprint": 2}),
}


def photo(size, mode, defect_box=None, seed=0):
    """A noisy grey-brown 'photograph', with a dark patch where the defect is."""
    w, h = size
    rng = np.random.default_rng(seed)
    a = (rng.random((h, w, 3)) * 40 + np.array([120, 100, 80])).astype(np.uint8)
    if defect_box is not None:
        x0, y0, x1, y1 = defect_box
        a[y0:y1, x0:x1] = 15
    im = Image.fromarray(a)
    if mode == "I;16":  # 16-bit grayscale, the full 0..65535 range
        return Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257)
    return im.convert(mode)


def write_mvtec(root: Path) -> None:
    """2 categories: train/good 3 images each, test/good and two defect types with masks (the
    plate's at half the image size, as some datasets store them). The plate's second test/good
    image is 16-bit; the capsule's first reference is RGBA."""
    seed = 0
    for cat, (size, mode, counts) in CATEGORIES.items():
        w, h = size
        for i in range(3):
            seed += 1
            path = root / cat / "train" / "good" / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            photo(size, "RGBA" if (cat, i) == ("capsule", 0) else mode, seed=seed).save(path)
        for d, n in counts.items():
            for i in range(n):
                seed += 1
                path = root / cat / "test" / d / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                box = None if d == "good" else (w // 8, h // 8, w // 3, h // 3)  # top-left
                m = "I;16" if (cat, d, i) == ("metal_plate", "good", 1) else mode
                photo(size, m, box, seed=seed).save(path)
                if box is not None:
                    scale = 2 if cat == "metal_plate" else 1
                    mask = Image.new("L", (w // scale, h // scale), 0)
                    mask.paste(255, tuple(v // scale for v in box))
                    gt = root / cat / "ground_truth" / d
                    gt.mkdir(parents=True, exist_ok=True)
                    mask.save(gt / f"{i:03d}_mask.png")


def run(*args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """data/mvtec-like root: the folder, qa.jsonl and its held-out parts, with facts."""
    from sage.tools.convert import main as convert_main

    d = tmp_path_factory.mktemp("mvtec_data")
    write_mvtec(d / "mvtec")
    convert_main(["mvtec", str(d / "mvtec"), str(d / "qa.jsonl"), "--holdout", "0.5",
                  "--seed", "0", "--check_images"])
    # a subprocess with OMP_NUM_THREADS=1: in this process MKL would keep 2 threads and
    # generation runs 4x slower on busy cores
    for part in ("qa_train", "qa_test"):
        run("-m", "sage.tools.facts", "--data", str(d / f"{part}.jsonl"), "--out",
            str(d / "facts.jsonl"), "--model", str(BASE), "--max_new_tokens", "12", "--fill")
    return d


def test_convert_and_split(data):
    every = load_jsonl(data / "qa.jsonl", check_images="decode")
    train = load_jsonl(data / "qa_train.jsonl")
    test = load_jsonl(data / "qa_test.jsonl")
    assert len(every) == 5 * 14  # 14 test images, one group of 5 questions each
    # disjoint by group; every record in exactly one part
    assert not {r["group"] for r in train} & {r["group"] for r in test}
    assert sorted(r["id"] for r in train + test) == sorted(r["id"] for r in every)
    # per category x defect type half (rounded half up), at least one on each side
    held = {}
    for g in {r["group"] for r in test}:
        stratum = tuple(g.split("-")[1:3])
        held[stratum] = held.get(stratum, 0) + 1
    assert held == {("metal_plate", "good"): 1, ("metal_plate", "scratch"): 1,
                    ("metal_plate", "oil_spot"): 2, ("capsule", "good"): 2,
                    ("capsule", "crack"): 1, ("capsule", "faulty_imprint"): 1}
    for r in train + test:  # facts filled, normal_label written, regions from the masks
        assert len(r["facts"]) == 4 and r["normal_label"] in ("yes", "no")
        assert r["truth"]["region"] == ("top-left" if r["truth"]["anomalous"] else None)
        assert r["answers"][0].endswith(f"So the answer is {r['label'].capitalize()}.")


def test_sfe_on_one_part_evaluate_on_the_other(data, tmp_path):
    run("train_sfe.py", "--data", str(data), "--split", "qa_train", "--init", str(BASE),
        "--max_steps", "2", "--global_batch", "4", "--micro_batch", "2", "--recipe", "tiny",
        "--log_every", "1", "--out", str(tmp_path / "sfe"))
    out = tmp_path / "eval"
    run("evaluate.py", "--model", str(tmp_path / "sfe" / "export"), "--names", "SFE",
        "--data", str(data), "--split", "qa_test", "--setting", "both", "--no-sbert",
        "--max_new_tokens", "8", "--out", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    test = load_jsonl(data / "qa_test.jsonl")
    assert set(metrics["results"]["SFE"]) == {"zero-shot", "one-shot"}
    assert metrics["results"]["SFE"]["one-shot"]["n"] == len(test) == 40
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 * len(test)

    # Always normal, by hand: 3 of the 8 held-out parts are normal (plate 1, capsule 2), and
    # only their groups are all right: Acc-G 3 / 8. Per question, the answerer is right on
    # every question about a normal part; about a defective part on none, except the
    # identification question that names a type the part does not have (1 of 5).
    floor = metrics["references"]["Always normal"]
    assert floor["acc_g"]["overall"] == 37.5 and floor["n"] == 40 and floor["mle"] is None
    by_level = {}
    for r in test:
        right = 5 if not r["truth"]["anomalous"] else (1 if r["level"] == "identification"
                                                       else 0)
        by_level.setdefault(r["level"], []).append(right / 5)  # per record: the group's share
    for level, shares in by_level.items():
        assert floor["accuracy"][level] == pytest.approx(100 * sum(shares) / len(shares))
    report = (out / "report.md").read_text()
    assert report.count("| Always normal (reference) |") == 1


def test_images_of_any_mode_and_size(tmp_path):
    # 16-bit grayscale is scaled (65535 -> 255), not clipped to white
    a = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    assert np.asarray(open_rgb(Image.fromarray(a)))[0, :, 0].tolist() == [0, 100, 255]
    i32 = Image.fromarray(np.array([[0, 257 * 50]], dtype=np.int32))  # older Pillow's 16-bit
    assert np.asarray(open_rgb(i32))[0, :, 0].tolist() == [0, 50]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(open_rgb(f))[0, :, 0].tolist() == [0, 128, 255]
    p = Image.new("P", (5, 5), 3)
    p.putpalette([0, 0, 0, 9, 9, 9, 0, 0, 0, 200, 100, 50])
    p.info["transparency"] = 0
    assert open_rgb(p).getpixel((0, 0)) == (200, 100, 50)
    for mode, size in [("L", (333, 271)), ("RGBA", (31, 7)), ("LA", (5, 90)), ("1", (3, 3)),
                       ("CMYK", (64, 48)), ("I;16", (333, 271)), ("P", (17, 19))]:
        path = tmp_path / f"{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
        Image.new(mode, size).save(path)
        x = load_image(path, 28, dynamic=True, max_tiles=4)
        assert x.shape[1:] == (3, 28, 28) and torch.isfinite(x).all(), mode
    # an undecodable image: the error names the file
    bad = tmp_path / "truncated.png"
    bad.write_bytes((tmp_path / "L.png").read_bytes()[:60])
    with pytest.raises(ValueError, match=r"cannot decode image .*truncated.png"):
        load_image(bad, 28)
