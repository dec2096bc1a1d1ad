#!/usr/bin/env python
"""scripts/train_cnn.py: train the siamese U-Net shipped in models/building_change_cnn.*.

Trains, with PyTorch on the CPU, the small network that `pipeline.detect.convnet` runs in
NumPy, from the LEVIR-CD images in ``../shared/data`` only (the nine ``levir_cd`` crops and
the five ``levir_cd_tiles``; never DSIFN or Nanjing), with the protocol of ``scripts/train.py``:

- four **fold models** for the held-out evaluation (FOLDS): the fourteen images grouped by
  their LEVIR-CD tile, each fold holding out one or two tiles' images (about a quarter of the
  crops and of the tiles) and trained on all the others; ``make eval`` scores each image with
  the fold that held it out (the same folds as the LightGBM model's, `LEVIR_TILE_FOLDS`).
- the **shipped model**, trained on all fourteen images; it has no held-out figure of its own.

Training data: every image as is and in augmented copies made by ``scripts/train.py``'s
`augment` (its own new buildings copy-pasted as new and as unchanged, rotation and flip,
rescaling, per-date hue, gamma, gain, blur and noise jitter); each date is standardised per
band (`pipeline.detect.convnet.standardize`). Batches of 128 x 128 windows, half of them
centred near a change pixel; a share SAME_DATE_SHARE of the windows pairs one date with itself
shifted by up to a pixel and labels it all unchanged (misregistration and a building seen twice
are not new). Loss: binary cross-entropy plus soft Dice. Adam with weight decay, a one-cycle
learning rate, and an exponential moving average of the weights, which is what is exported,
with batch normalisation folded into the convolutions.

The decision rule is fixed in advance, not fitted: probability > 0.5 after Gaussian smoothing
of SMOOTH_SIGMA_PX, regions below MIN_AREA_M2 dropped.

Needs PyTorch (``make train-cnn`` installs ``torch==2.13.0``; inference does not need it).
Progress goes to stderr.

Examples::

    .venv/bin/python scripts/train_cnn.py
    .venv/bin/python scripts/train_cnn.py --fold tiles --out /tmp/cnn.json --steps 200
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from pipeline.datasets import (  # noqa: E402,I001
    DEFAULT_DATA_DIR,
    LEVIR_TILE_FOLDS,
    LabelledPair,
    read_levir_crops,
    read_levir_tiles,
)
from pipeline.detect.convnet import DECODER, ENCODER, standardize  # noqa: E402
from pipeline.models import DEFAULT_CNN_PATH, save_cnn  # noqa: E402
from train import augment  # noqa: E402  (scripts/train.py: the same augmented copies)

log = logging.getLogger("train_cnn")

SEED = 20261126
WIDTH = 8  # channels of the first level; 2x, 4x, 8x below
STEPS = 1500
BATCH = 8
PATCH_PX = 128
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4
EMA_DECAY = 0.99
NEAR_CHANGE_SHARE = 0.5  # windows centred near a change pixel
SAME_DATE_SHARE = 0.3  # windows of one date paired with itself, all unchanged
SCALE_RANGE = (0.7, 1.4)
COPIES_PX = 2_000_000  # pixels of augmented copies per image (at least one copy, at most 30)
MAX_COPIES = 30
DECISION = {"threshold": 0.5, "smooth_sigma_px": 1.0, "min_area_m2": 10.0}
FOLDS = LEVIR_TILE_FOLDS  # four folds by LEVIR-CD tile, shared with scripts/train.py


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise SystemExit("scripts/train_cnn.py needs PyTorch: run `make train-cnn`, which "
                         "installs torch==2.13.0 into .venv, or `.venv/bin/pip install "
                         "torch==2.13.0`.") from e
    return torch


def build_net(width: int = WIDTH):
    """The PyTorch network whose folded arrays `pipeline.detect.convnet.forward` runs."""
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o),
                             nn.ReLU(inplace=True), nn.Conv2d(o, o, 3, padding=1, bias=False),
                             nn.BatchNorm2d(o), nn.ReLU(inplace=True))

    class SiamUNet(nn.Module):
        def __init__(self, c):
            super().__init__()
            ins = (3, c, 2 * c, 4 * c)
            for name, i, o in zip(ENCODER, ins, (c, 2 * c, 4 * c, 8 * c), strict=True):
                setattr(self, name, block(i, o))
            for name, i, o in zip(DECODER, (16 * c, 8 * c, 4 * c), (4 * c, 2 * c, c), strict=True):
                setattr(self, name, block(i, o))
            self.out = nn.Conv2d(c, 1, 1)

        def encode(self, x):
            levels = [getattr(self, ENCODER[0])(x)]
            for name in ENCODER[1:]:
                levels.append(getattr(self, name)(F.max_pool2d(levels[-1], 2)))
            return levels

        def forward(self, a, b):
            fa, fb = self.encode(a), self.encode(b)
            x = (fa[-1] - fb[-1]).abs()
            for name, lv in zip(DECODER, range(len(ENCODER) - 2, -1, -1), strict=True):
                x = torch.cat([F.interpolate(x, scale_factor=2), (fa[lv] - fb[lv]).abs(),
                               fb[lv]], 1)
                x = getattr(self, name)(x)
            return self.out(x)[:, 0]

    return SiamUNet(width)


def fold_batch_norm(state: dict, eps: float = 1e-5) -> dict[str, np.ndarray]:
    """Each block's (conv, batch norm) pairs as one convolution with a bias."""
    out = {"out.weight": state["out.weight"].numpy().astype(np.float32),
           "out.bias": state["out.bias"].numpy().astype(np.float32)}
    for name in (*ENCODER, *DECODER):
        for k, (conv, bn) in enumerate(((0, 1), (3, 4))):
            w = state[f"{name}.{conv}.weight"].double()
            scale = (state[f"{name}.{bn}.weight"].double()
                     / (state[f"{name}.{bn}.running_var"].double() + eps).sqrt())
            shift = (state[f"{name}.{bn}.bias"].double()
                     - state[f"{name}.{bn}.running_mean"].double() * scale)
            out[f"{name}.{k}.weight"] = (w * scale[:, None, None, None]).float().numpy()
            out[f"{name}.{k}.bias"] = shift.float().numpy()
    return out


def training_images(pairs: list[LabelledPair], seed: int
                    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Standardised (before, after, change) of every pair and its augmented copies."""
    out = []
    for pair in pairs:
        copies = int(np.clip(round(COPIES_PX / pair.label.size), 1, MAX_COPIES))
        for c in range(copies + 1):
            before, after, label = augment(pair, c, seed)
            valid = np.ones(label.shape, bool)
            out.append((standardize(before, valid), standardize(after, valid),
                        (label == 1).astype(np.float32)))
    return out


def _window(image, rng: np.random.Generator, size: int):
    """A (before, after, change) window of ``image``, rescaled, turned, flipped and maybe
    replaced by a same-date pair."""
    a, b, y = image
    ny, nx = y.shape
    side = min(int(size * rng.uniform(*SCALE_RANGE)), ny, nx)
    if rng.random() < NEAR_CHANGE_SHARE and y.any():
        ys, xs = np.nonzero(y)
        k = int(rng.integers(ys.size))
        r = int(np.clip(ys[k] - rng.integers(side), 0, ny - side))
        c = int(np.clip(xs[k] - rng.integers(side), 0, nx - side))
    else:
        r, c = int(rng.integers(ny - side + 1)), int(rng.integers(nx - side + 1))
    win = np.concatenate([a[:, r:r + side, c:c + side], b[:, r:r + side, c:c + side],
                          y[None, r:r + side, c:c + side]])
    if rng.random() < SAME_DATE_SHARE:
        date = win[:3] if rng.random() < 0.5 else win[3:6]
        shifted = np.roll(date, tuple(int(s) for s in rng.integers(-1, 2, 2)), (1, 2))
        win = np.concatenate([date, shifted, np.zeros_like(win[6:])])
    win = np.rot90(win, int(rng.integers(4)), (1, 2))
    return win[:, :, ::-1] if rng.random() < 0.5 else win


def _batch(images, rng: np.random.Generator, torch):
    F = torch.nn.functional
    wins = []
    for _ in range(BATCH):
        win = torch.from_numpy(np.ascontiguousarray(_window(images[rng.integers(len(images))],
                                                            rng, PATCH_PX)))
        win = F.interpolate(win[None], size=(PATCH_PX, PATCH_PX), mode="bilinear",
                            align_corners=False)[0]
        wins.append(win)
    x = torch.stack(wins)
    gain = torch.from_numpy(rng.uniform(0.8, 1.2, (BATCH, 6, 1, 1)).astype(np.float32))
    offset = torch.from_numpy(rng.normal(0, 0.2, (BATCH, 6, 1, 1)).astype(np.float32))
    x6 = x[:, :6] * gain + offset
    return x6[:, :3], x6[:, 3:], (x[:, 6] > 0.5).float()


def train(pairs: list[LabelledPair], seed: int, steps: int = STEPS, width: int = WIDTH
          ) -> dict[str, np.ndarray]:
    """Train on ``pairs``; the folded arrays of the moving-average weights."""
    torch = _torch()
    F = torch.nn.functional
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = training_images(pairs, seed)
    net = build_net(width)
    ema = copy.deepcopy(net)
    opt = torch.optim.AdamW(net.parameters(), LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, LEARNING_RATE, total_steps=steps)
    for step in range(1, steps + 1):
        a, b, y = _batch(images, rng, torch)
        logits = net(a, b)
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
        loss = F.binary_cross_entropy_with_logits(logits, y) + dice
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, w in zip(ema.state_dict().values(), net.state_dict().values(), strict=True):
                e.copy_(e * EMA_DECAY + w * (1 - EMA_DECAY) if e.dtype.is_floating_point else w)
        if step % 100 == 0 or step == steps:
            log.info("step %d/%d loss %.3f", step, steps, loss.item())
    return fold_batch_norm(ema.state_dict())


def card(pairs: list[LabelledPair], seed: int, steps: int, width: int, **extra) -> dict:
    """The model card of a network trained on ``pairs``."""
    torch = _torch()
    return {
        "name": "building_change_cnn",
        "task": "pixel probability that a building appeared between two RGB dates (0.3-1 m)",
        "architecture": f"siamese U-Net, widths {width}/{2 * width}/{4 * width}/{8 * width}, "
                        "decoder on |after - before| and after features; batch norm folded",
        **DECISION,
        "decision_rule": "Gaussian-smoothed probability > threshold (fixed at 0.5, not "
                         "fitted); regions < min_area_m2 dropped",
        "trained_on": [f"{p.dataset}/{p.name}" for p in sorted(pairs, key=lambda p: p.name)],
        "training": {"steps": steps, "batch": BATCH, "patch_px": PATCH_PX, "width": width,
                     "learning_rate": LEARNING_RATE, "weight_decay": WEIGHT_DECAY,
                     "ema_decay": EMA_DECAY, "near_change_share": NEAR_CHANGE_SHARE,
                     "same_date_share": SAME_DATE_SHARE, "scale_range": list(SCALE_RANGE),
                     "copies_px": COPIES_PX, "max_copies": MAX_COPIES, "seed": seed,
                     "loss": "binary cross-entropy + soft Dice",
                     "torch": torch.__version__},
        "data_terms": "LEVIR-CD: academic use only. The data are not in this repository; "
                      "the model was trained from ../shared/data at build time.",
        "command": "make train-cnn  (.venv/bin/python scripts/train_cnn.py)",
        **extra,
    }


def _train_and_save(pairs: list[LabelledPair], path: Path, args, **extra) -> None:
    """Train on ``pairs``, write the arrays and card to ``path`` with the run's own time."""
    started, usage0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    weights = train(pairs, args.seed, args.steps, args.width)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage.ru_utime + usage.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    meta = card(pairs, args.seed, args.steps, args.width, **extra,
                trained_utc=datetime.now(UTC).isoformat(timespec="seconds"),
                machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
                train_seconds=round(time.perf_counter() - started, 1),
                train_cpu_seconds=round(cpu, 1))
    save_cnn(weights, meta, path)
    log.info("wrote %s in %.0f s (%.0f s CPU)", path, meta["train_seconds"], cpu)


def main(argv: list[str] | None = None) -> int:
    """Train the fold networks and the shipped one (or those named); write them beside --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_CNN_PATH,
                        help="shipped model card (.json); fold models and .npz go beside it")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--only", nargs="+", choices=[*FOLDS, "shipped"],
                        help="train only these (e.g. to run folds in parallel processes)")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    _torch().set_num_threads(args.threads)
    pairs = read_levir_crops(args.data_dir) + read_levir_tiles(args.data_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only or [*FOLDS, "shipped"])
    fold_cards = {fold: args.out.with_name(f"{args.out.stem}_fold_{fold}.json").name
                  for fold in FOLDS}
    for fold, groups in FOLDS.items():
        if fold not in wanted:
            continue
        used = [p for p in pairs if p.group not in groups]
        held = [f"{p.dataset}/{p.name}" for p in pairs if p.group in groups]
        _train_and_save(used, args.out.with_name(fold_cards[fold]), args, fold=fold,
                        held_out=held, held_out_tiles=list(groups))
    if "shipped" in wanted:
        _train_and_save(pairs, args.out, args, fold_models=fold_cards, held_out=[],
                        not_trained_on=["dsifn", "landsat_nanjing"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
