#!/usr/bin/env python
"""scripts/train.py: train the new-building pixel classifier shipped in models/.

Trains a LightGBM classifier on the per-pixel features of `pipeline.core.features` from the
five LEVIR-CD tiles in ``../shared/data/levir_cd_tiles`` only (never DSIFN, never the nine
``levir_cd`` evaluation crops). Every tile is used several times, augmented: flips and 90-degree
rotations, rescaling, and per-date brightness, contrast, colour-balance, gamma, blur and noise
jitter, so the model does not learn one sensor's or one day's radiometry. From each copy all
change pixels and a random sample of unchanged ones are kept.

The decision threshold, the probability smoothing and the minimum region size are chosen by
leave-one-tile-out cross-validation on the tiles (train on four, predict the fifth
un-augmented, pool the five predictions, maximise F1); the evaluation crops play no part. The
cross-validated figures are written into the model card, labelled as such.

Progress goes to stderr; the model goes to ``models/building_change.{txt,json}``.

Examples::

    .venv/bin/python scripts/train.py   # 23 min on 2 shared cores (load ~6), ~6-10 free
    .venv/bin/python scripts/train.py --no-cv --out /tmp/m.json
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import lightgbm as lgb
import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.features import FEATURE_NAMES, pixel_features  # noqa: E402
from pipeline.datasets import DEFAULT_DATA_DIR, LabelledPair, read_levir_tiles  # noqa: E402
from pipeline.detect.learned import change_probability_mask  # noqa: E402
from pipeline.models import DEFAULT_MODEL_PATH, save_model  # noqa: E402

log = logging.getLogger("train")

SEED = 20240601
N_COPIES = 4  # the original plus three augmented copies of every tile
N_NEGATIVE = 25_000  # unchanged pixels sampled per copy
MAX_POSITIVE = 15_000  # change pixels kept per copy
N_PASTE = 10  # buildings pasted per augmented copy: as new (after only) and as unchanged (both)
SCALE_RANGE = (0.7, 1.4)
LGB_PARAMS = {
    "objective": "binary", "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 200,
    "feature_fraction": 0.7, "bagging_fraction": 0.7, "bagging_freq": 1, "lambda_l2": 1.0,
    "max_bin": 63, "verbose": -1, "num_threads": 2, "deterministic": True,
    "force_row_wise": True,
}
N_TREES = 200
THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.025), 3)
MIN_AREAS_PX = (0, 25, 50, 100)
SMOOTH_SIGMAS_PX = (0.0, 1.0, 2.0)


_OPP = np.array([[1 / 3, 1 / 3, 1 / 3], [1.0, -1.0, 0.0], [0.5, 0.5, -1.0]])


def _jitter_hue(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate and scale the chroma of a (3, y, x) image in an opponent-colour space."""
    angle, sat = rng.uniform(-0.6, 0.6), rng.uniform(0.4, 1.3)
    rot = np.array([[1.0, 0.0, 0.0],
                    [0.0, sat * np.cos(angle), -sat * np.sin(angle)],
                    [0.0, sat * np.sin(angle), sat * np.cos(angle)]])
    m = np.linalg.inv(_OPP) @ rot @ _OPP
    return np.einsum("ij,jyx->iyx", m, x)


def _jitter_date(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random per-date radiometry: hue, saturation, contrast, gain, offset, gamma, blur, noise."""
    x = np.clip(img / 255.0, 0.0, 1.0)
    x = np.clip(_jitter_hue(x, rng), 0.0, 1.0) ** rng.uniform(0.75, 1.33)
    gain = rng.uniform(0.75, 1.25) * rng.uniform(0.9, 1.1, size=(3, 1, 1))
    x = x * gain + rng.uniform(-0.08, 0.08)
    if rng.random() < 0.3:
        x = ndi.gaussian_filter(x, (0, rng.uniform(0.5, 1.2), rng.uniform(0.5, 1.2)))
    x = x + rng.normal(0.0, rng.uniform(0.0, 0.015), x.shape)
    return (np.clip(x, 0.0, 1.0) * 255.0).astype(np.float32)


def _paste_buildings(before, after, label, rng):
    """Copy-paste the tile's own new buildings elsewhere: as new, and as unchanged.

    Each pasted patch is the after-date pixels of one labelled building plus a 4-pixel margin
    (its edges and part of its shadow), turned by a multiple of 90 degrees, put where nothing
    changed. Half go into the after date only (labelled change, on a new background), half
    into both dates (labelled no change: a roof seen twice is not new).
    """
    objects, n = ndi.label(label == 1, structure=np.ones((3, 3), bool))
    if n == 0:
        return before, after, label
    before, after, label = before.copy(), after.copy(), label.copy()
    boxes = ndi.find_objects(objects)
    busy = ndi.binary_dilation(label == 1, iterations=8)
    for i in range(N_PASTE):
        k = int(rng.integers(n))
        sl = tuple(slice(max(s.start - 4, 0), s.stop + 4) for s in boxes[k])
        roof = objects[sl] == k + 1
        region = ndi.binary_dilation(roof, iterations=4)
        patch = after[(slice(None), *sl)]
        turns = int(rng.integers(4))
        roof, region = np.rot90(roof, turns), np.rot90(region, turns)
        patch = np.rot90(patch, turns, axes=(1, 2))
        h, w = roof.shape
        if h >= label.shape[0] or w >= label.shape[1]:
            continue
        y0, x0 = int(rng.integers(label.shape[0] - h)), int(rng.integers(label.shape[1] - w))
        dst = np.s_[y0:y0 + h, x0:x0 + w]
        if busy[dst][region].any():
            continue
        after[(slice(None), *dst)][:, region] = patch[:, region]
        if i % 2:  # unchanged building: in both dates, no change
            before[(slice(None), *dst)][:, region] = patch[:, region]
            label[dst][region] = 0
        else:
            label[dst][region] = 0
            label[dst][roof] = 1
        busy[dst] |= region
    return before, after, label


def augment(pair: LabelledPair, copy: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copy 0 is the pair as is; others get pasted buildings, flips/rotations, rescaling and
    per-date radiometric jitter."""
    before, after, label = pair.before, pair.after, pair.label
    if copy == 0:
        return before, after, label
    rng = np.random.default_rng([seed, copy, zlib.crc32(pair.name.encode())])
    before, after, label = _paste_buildings(before, after, label, rng)
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    geo = [np.rot90(a, k, axes=(-2, -1)) for a in (before, after, label)]
    if flip:
        geo = [a[..., ::-1] for a in geo]
    scale = float(np.exp(rng.uniform(*np.log(SCALE_RANGE))))
    before = ndi.zoom(geo[0], (1, scale, scale), order=1)
    after = ndi.zoom(geo[1], (1, scale, scale), order=1)
    label = ndi.zoom(geo[2], scale, order=0)
    return _jitter_date(before, rng), _jitter_date(after, rng), label


def _sample(feats: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    """All change pixels (up to MAX_POSITIVE) and N_NEGATIVE random unchanged ones."""
    flat = label.ravel()
    pos = np.flatnonzero(flat == 1)
    neg = np.flatnonzero(flat == 0)
    pos = rng.choice(pos, min(pos.size, MAX_POSITIVE), replace=False) if pos.size else pos
    neg = rng.choice(neg, min(neg.size, N_NEGATIVE), replace=False)
    idx = np.sort(np.concatenate([pos, neg]))
    x = feats.reshape(feats.shape[0], -1)[:, idx].T
    return np.ascontiguousarray(x), flat[idx].astype(np.float32)


def _features_of_copy(pair: LabelledPair, copy: int, seed: int):
    """Features of one (augmented) copy: sampled rows, and the full stack for copy 0."""
    before, after, label = augment(pair, copy, seed)
    feats = pixel_features(before, after)
    x, y = _sample(feats, label, np.random.default_rng([seed, copy, 7]))
    return pair.name, copy, x, y, (feats if copy == 0 else None)


def build_samples(pairs: list[LabelledPair], seed: int):
    """Sampled training rows per tile (all copies), and each tile's full un-augmented features."""
    jobs = [(p, c) for p in pairs for c in range(N_COPIES)]
    rows: dict[str, list] = {p.name: [] for p in pairs}
    full: dict[str, np.ndarray] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(_features_of_copy, p, c, seed) for p, c in jobs]
        for i, fut in enumerate(futures, 1):
            name, copy, x, y, feats = fut.result()
            rows[name].append((x, y))
            if feats is not None:
                full[name] = feats
            log.info("features %d/%d: %s copy %d (%d rows)", i, len(jobs), name, copy, y.size)
    return rows, full


def fit(rows: dict[str, list], names: list[str], seed: int) -> lgb.Booster:
    """LightGBM on the sampled rows of the tiles in ``names``."""
    x = np.concatenate([x for n in names for x, _ in rows[n]])
    y = np.concatenate([y for n in names for _, y in rows[n]])
    params = {**LGB_PARAMS, "seed": seed}
    data = lgb.Dataset(x, y, feature_name=list(FEATURE_NAMES), free_raw_data=True)
    return lgb.train(params, data, num_boost_round=N_TREES)


def _predict_full(booster: lgb.Booster, feats: np.ndarray) -> np.ndarray:
    """Probability map of a full feature stack."""
    n, ny, nx = feats.shape
    flat = np.ascontiguousarray(feats.reshape(n, -1).T)
    return booster.predict(flat, num_threads=2).astype(np.float32).reshape(ny, nx)


def _prior(rows: dict[str, list], names: list[str]) -> float:
    """Share of change pixels in the sampled rows of ``names``."""
    y = np.concatenate([y for n in names for _, y in rows[n]])
    return float(y.mean())


def _sweep(probs: dict[str, np.ndarray], pairs: list[LabelledPair]) -> list[tuple]:
    """Pooled (tp, fp, fn) for every smoothing, threshold and minimum area."""
    out = []
    eight = np.ones((3, 3), bool)
    for sigma in SMOOTH_SIGMAS_PX:
        smooth = {n: ndi.gaussian_filter(np.nan_to_num(p), sigma) if sigma else np.nan_to_num(p)
                  for n, p in probs.items()}
        for thr in THRESHOLDS:
            counts = {a: np.zeros(3, np.int64) for a in MIN_AREAS_PX}
            for pair in pairs:
                labels, n = ndi.label(smooth[pair.name] > thr, structure=eight)
                sizes = np.bincount(labels.ravel(), minlength=n + 1)
                truth = pair.label == 1
                tp_per = np.bincount(labels[truth], minlength=n + 1)
                for a in MIN_AREAS_PX:
                    keep = sizes >= max(a, 1)
                    keep[0] = False
                    tp = int(tp_per[keep].sum())
                    counts[a] += [tp, int(sizes[keep].sum()) - tp, int(truth.sum()) - tp]
            out += [(sigma, a, float(thr), c) for a, c in counts.items()]
    return out


def _f1(c: np.ndarray) -> float:
    return float(2 * c[0] / max(2 * c[0] + c[1] + c[2], 1))


def cross_validate(pairs: list[LabelledPair], rows, full, seed: int) -> dict:
    """Leave-one-tile-out: choose threshold, smoothing and minimum area by pooled F1."""
    probs = {}
    for held in pairs:
        others = [p.name for p in pairs if p.name != held.name]
        t0 = time.perf_counter()
        booster = fit(rows, others, seed)
        probs[held.name] = _predict_full(booster, full[held.name])
        log.info("cv: held out %s (%.0f s)", held.name, time.perf_counter() - t0)
    sigma, area, thr, counts = max(_sweep(probs, pairs), key=lambda r: _f1(r[3]))
    choice = {"threshold": thr, "min_area_px": int(area), "smooth_sigma_px": float(sigma)}
    per_tile = {}
    for p in pairs:
        mask = change_probability_mask(probs[p.name], **choice)
        c = _counts(mask, p.label)
        per_tile[p.name] = {"precision": round(c[0] / max(c[0] + c[1], 1), 4),
                            "recall": round(c[0] / max(c[0] + c[2], 1), 4),
                            "f1": round(_f1(c), 4)}
    log.info("cv: best pooled F1 %.3f at %s", _f1(counts), choice)
    return {**choice, "cv_pooled_f1": round(_f1(counts), 4), "cv_per_tile": per_tile}


def _counts(mask: np.ndarray, label: np.ndarray) -> np.ndarray:
    """(tp, fp, fn) of a boolean mask against a 0/1 label."""
    truth = label == 1
    return np.array([(mask & truth).sum(), (mask & ~truth).sum(), (~mask & truth).sum()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_PATH,
                        help="model card path (.json); the .txt model goes beside it")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--no-cv", action="store_true",
                        help="skip cross-validation (keeps threshold 0.5, no clean-up)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    started = time.perf_counter()
    pairs = read_levir_tiles(args.data_dir)
    rows, full = build_samples(pairs, args.seed)
    cv = ({"threshold": 0.5, "min_area_px": 0, "smooth_sigma_px": 0.0} if args.no_cv
          else cross_validate(pairs, rows, full, args.seed))
    booster = fit(rows, [p.name for p in pairs], args.seed)
    seconds = time.perf_counter() - started
    card = {
        "name": "building_change",
        "task": "pixel probability that a building appeared between two RGB dates (0.3-1 m)",
        "feature_names": list(FEATURE_NAMES),
        **cv,
        "train_change_share": round(_prior(rows, [p.name for p in pairs]), 6),
        "trained_on": [f"levir_cd_tiles/{p.name}" for p in pairs],
        "not_trained_on": ["levir_cd (the nine evaluation crops)", "dsifn", "landsat_nanjing"],
        "data_terms": "LEVIR-CD: academic use only. The data are not in this repository; "
                      "the model was trained from ../shared/data at build time.",
        "augmentation": {"copies_per_tile": N_COPIES, "rot90_and_flip": True,
                         "scale_range": list(SCALE_RANGE),
                         "per_date_jitter": "gamma 0.75-1.33, gain 0.75-1.25 x band 0.9-1.1, "
                                            "offset +-0.08, blur p=0.3, noise <= 0.015"},
        "sampling": {"negatives_per_copy": N_NEGATIVE, "max_positives_per_copy": MAX_POSITIVE},
        "lightgbm": {**LGB_PARAMS, "seed": args.seed, "num_boost_round": N_TREES,
                     "version": lgb.__version__},
        "command": "make train  (.venv/bin/python scripts/train.py)",
        "trained_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "train_seconds": round(seconds, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = save_model(booster, card, args.out)
    log.info("wrote %s in %.0f s", path, seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
