"""The data behind the bundled default model: scikit-learn's handwritten digits, the prompt set,
the fixed held-out split and a small digit classifier that judges generated images.

Why one module: the training recipe (``train_default``), the default model's tests and the
quality harness must agree on exactly the same prompts, the same held-out digits and the same
32x32 <-> 8x8 resampling, or their numbers are not comparable.

NumPy and Pillow at import time (both runtime dependencies); scikit-learn is imported only by
the functions that need it (it ships with the export extra).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: Prompt forms seen in training; ``{}`` is filled with the numeral ("7") or the word ("seven").
PROMPT_TEMPLATES = (
    "a handwritten digit {}",
    "handwritten digit {}",
    "the digit {}",
    "digit {}",
    "the number {}",
    "number {}",
    "a handwritten {}",
    "{}",
    "an image of the digit {}",
    "a picture of the number {}",
    "a drawing of a {}",
    "a written {}",
)

IMAGE_SIZE = 32  # pixels of the generated images (8x8 latents with a 4x VAE)
PIXEL_MAX = 16.0  # load_digits grey levels run 0..16
HOLDOUT_FILE = "holdout.json"


def prompt_for_digit(digit: int) -> str:
    """The canonical prompt used by tests and the quality harness."""
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


def prompt_variants(digit: int) -> list[str]:
    """Every training prompt for ``digit``: each template with the numeral and with the word."""
    return [t.format(v) for t in PROMPT_TEMPLATES for v in (str(digit), DIGIT_WORDS[digit])]


def vocabulary_words() -> list[str]:
    """Words that get their own BPE token (numerals are single bytes already)."""
    words = set(DIGIT_WORDS)
    for template in PROMPT_TEMPLATES:
        words.update(w for w in template.replace("{}", " ").split())
    return sorted(words)


def load_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float32 ``(N, 8, 8)`` in 0..16 and their int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def holdout_split(
    labels: np.ndarray, fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split -> ``(train_indices, holdout_indices)``, both sorted."""
    rng = np.random.default_rng(seed)
    holdout: list[int] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        take = round(len(members) * fraction)
        holdout.extend(rng.choice(members, size=take, replace=False).tolist())
    held = np.sort(np.asarray(holdout, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), held)
    return train, held


def save_holdout(model_dir: str | Path, holdout: np.ndarray, seed: int) -> None:
    payload = {
        "dataset": "sklearn.datasets.load_digits",
        "seed": seed,
        "indices": [int(i) for i in holdout],
    }
    (Path(model_dir) / HOLDOUT_FILE).write_text(json.dumps(payload) + "\n")


def read_holdout(model_dir: str | Path) -> np.ndarray:
    """The held-out indices (into ``load_digits()`` order) the model never trained on."""
    payload = json.loads((Path(model_dir) / HOLDOUT_FILE).read_text())
    return np.asarray(payload["indices"], dtype=np.int64)


def upsample(images8: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """``(N, 8, 8)`` digits in 0..16 -> ``(N, 3, size, size)`` float32 RGB in [-1, 1]
    (bicubic, grey replicated), the pixel format the VAE is trained on."""
    from PIL import Image

    out = np.empty((len(images8), size, size), dtype=np.float32)
    for i, img in enumerate(images8):
        pil = Image.fromarray(np.asarray(img, dtype=np.float32), mode="F")
        out[i] = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
    out = np.clip(out / PIXEL_MAX * 2.0 - 1.0, -1.0, 1.0)
    return np.repeat(out[:, None], 3, axis=1)


def to_digits8(images: np.ndarray) -> np.ndarray:
    """Generated images -> the classifier's features, ``(N, 64)`` in 0..16.

    Accepts ``(N, 3, H, W)`` in [-1, 1] (model output) or ``(N, H, W, 3)`` uint8 (PNG pixels);
    grey is the channel mean, then each (H/8 x W/8) block is averaged.
    """
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        grey = arr.astype(np.float32).mean(axis=-1) / 255.0 * PIXEL_MAX
    else:
        grey = (np.clip(arr.astype(np.float32).mean(axis=1), -1.0, 1.0) + 1.0) / 2.0 * PIXEL_MAX
    n, h, w = grey.shape
    blocks = grey.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
    return blocks.reshape(n, 64)


def shift(images: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Move ``(N, C, H, W)`` images in [-1, 1] by whole pixels, filling with background (-1)."""
    pad = max(abs(dx), abs(dy))
    if pad == 0:
        return images
    h, w = images.shape[-2:]
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-1.0)
    return padded[:, :, pad - dy : pad - dy + h, pad - dx : pad - dx + w]


#: The light augmentation used for the VAE and the judge: every shift of at most one pixel.
SHIFTS = tuple((dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1))


class DigitJudge:
    """An RBF SVM on 8x8 digits, fitted on the held-out digits (with one-pixel shifts) after the
    same 8 -> 32 -> 8 round trip generated images go through, so it judges shape, not
    resampling blur. On the 1618 training digits it scores ~97%: the ceiling of what it can
    report for a perfect generator."""

    def __init__(self, model_dir: str | Path) -> None:
        from sklearn.svm import SVC

        images, labels = load_digits_8x8()
        held = read_holdout(model_dir)
        pixels = upsample(images[held])
        features = np.concatenate([to_digits8(shift(pixels, dx, dy)) for dx, dy in SHIFTS])
        targets = np.tile(labels[held], len(SHIFTS))
        self.classifier = SVC(C=10.0, gamma=0.002).fit(features, targets)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.classifier.predict(to_digits8(images)).astype(np.int64)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))
