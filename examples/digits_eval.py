"""Data, checkpoints and quality measures of the digits demo.

The demo trains a small class-conditional DiT (official architecture, ``lazypass.models.DiT``)
on scikit-learn's ``load_digits`` (1,797 handwritten 8x8 digits, values 0..16, scaled here to
[-1, 1]; one channel, patch 1, so 64 tokens) and a small CNN classifier on the same data. The
classifier's penultimate layer is the feature space of the Frechet distance (FD, the FID
recipe with a digits network instead of Inception) and its output gives the accuracy on the
requested labels.

Example:
    >>> from digits_eval import load_digit_images, frechet_distance
    >>> x, y = load_digit_images()
    >>> x.shape, float(x.min()), float(x.max())
    (torch.Size([1797, 1, 8, 8]), -1.0, 1.0)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lazypass.models import DiT

ASSETS = Path(__file__).resolve().parent / "assets"
DIT_PATH = ASSETS / "digits_dit.safetensors"
CLASSIFIER_PATH = ASSETS / "digits_classifier.safetensors"

DIT_CONFIG = dict(
    input_size=8, patch_size=1, in_channels=1, hidden_size=64, depth=4, num_heads=4,
    mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=False,
)  # fmt: skip
NULL_CLASS = DIT_CONFIG["num_classes"]


def gates_path(ratio: float, steps: int) -> Path:
    """Where the main job's fitted gates live, e.g. ``digits_gates_50pct_20steps.safetensors``."""
    return ASSETS / f"digits_gates_{round(ratio * 100)}pct_{steps}steps.safetensors"


def load_digit_images() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as (N, 1, 8, 8) float32 in [-1, 1] and their labels (N,) int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x, torch.tensor(d.target, dtype=torch.long)


def split_indices(n: int, seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """A fixed train / test split of the digits (used by the classifier)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * test_fraction))
    return perm[k:], perm[:k]


class DigitClassifier(nn.Module):
    """Small CNN for 8x8 digits; ``features`` is the 64-d penultimate layer used for FD."""

    def __init__(self, feature_dim: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, feature_dim)
        self.fc2 = nn.Linear(feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.features(x))


def build_dit() -> DiT:
    return DiT(**DIT_CONFIG).eval()


def save_checkpoint(model: nn.Module, path: Path, metadata: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})


def checkpoint_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def _missing(path: Path, script: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path} not found; build it with `python examples/{script}`")


def load_dit(path: Path = DIT_PATH) -> DiT:
    """The trained digits DiT (eval mode). Its config is read from the checkpoint metadata."""
    if not path.exists():
        raise _missing(path, "train_digits.py")
    config = checkpoint_metadata(path).get("config", DIT_CONFIG)
    model = DiT(**config)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def load_classifier(path: Path = CLASSIFIER_PATH) -> DigitClassifier:
    if not path.exists():
        raise _missing(path, "train_digits.py --classifier")
    meta = checkpoint_metadata(path)
    model = DigitClassifier(meta.get("feature_dim", 64))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


# -- measures ------------------------------------------------------------------------


@torch.no_grad()
def classifier_outputs(classifier: DigitClassifier, images: Tensor, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (float64) and predicted labels of images in [-1, 1] (clamped)."""
    feats, preds = [], []
    for chunk in images.clamp(-1, 1).split(batch):
        f = classifier.features(chunk)
        feats.append(f.double().numpy())
        preds.append(classifier.fc2(f).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(stats_a: tuple[np.ndarray, np.ndarray], stats_b: tuple[np.ndarray, np.ndarray]) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between two Gaussians.

    The trace of the matrix square root is the sum of square roots of the eigenvalues of
    ``A^(1/2) S_b A^(1/2)`` with ``A = S_a`` (symmetric PSD, so no complex sqrtm is needed).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> a = gaussian_stats(rng.normal(size=(5000, 3)))
        >>> round(frechet_distance(a, a), 6)
        0.0
    """
    mu_a, s_a = stats_a
    mu_b, s_b = stats_b
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ s_b @ root_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


def psnr(images: Tensor, reference: Tensor) -> float:
    """Mean over samples of the PSNR (dB) against ``reference``, both in [-1, 1] (peak-to-peak 2)."""
    a, b = images.clamp(-1, 1).flatten(1), reference.clamp(-1, 1).flatten(1)
    mse = (a - b).pow(2).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


def accuracy(preds: np.ndarray, labels: Tensor) -> float:
    return float((preds == labels.numpy()).mean())
