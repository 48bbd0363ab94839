"""Train the digits demo's DiT and its evaluation classifier (CPU, 2 threads, seeded).

    PYTHONPATH=$PWD python examples/train_digits.py               # DiT (~10 min on 2 cores)
    PYTHONPATH=$PWD python examples/train_digits.py --classifier  # CNN for FD / accuracy (~1 min)

The DiT has the official architecture (adaLN-Zero blocks, ``lazypass.models.DiT``) at a tiny
size: 8x8x1 pixels, patch 1 (64 tokens), hidden 64, depth 4, 4 heads, 10 classes plus the null
class (labels dropped with probability 0.1 for classifier-free guidance), eps prediction
(``learn_sigma=False``), DiT's linear noise schedule. Loss: MSE on eps at uniform timesteps.
AdamW, linear warm-up then cosine decay, EMA of the weights (the EMA is what is saved).
Seeds, config and training time are stored in the safetensors metadata, so the checkpoints
can be rebuilt (bit-exactly on the same machine and torch build).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from digits_eval import (
    CLASSIFIER_PATH, DIT_CONFIG, DIT_PATH, DigitClassifier, build_dit, load_digit_images,
    save_checkpoint, split_indices,
)  # fmt: skip
from lazypass.sampling import add_noise


def train_dit(steps: int, batch: int, lr: float, seed: int, ema_decay: float) -> tuple[torch.nn.Module, dict]:
    x_all, y_all = load_digit_images()
    torch.manual_seed(seed)
    model = build_dit().train()
    ema = build_dit()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def lr_at(i: int) -> float:
        if i < warmup:
            return lr * (i + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

    from tqdm.auto import tqdm

    start = time.perf_counter()
    losses = []
    bar = tqdm(range(steps), desc="train DiT", mininterval=2.0)
    for i in bar:
        idx = torch.randint(0, len(x_all), (batch,))
        x0, y = x_all[idx], y_all[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,))
        loss = F.mse_loss(model(add_noise(x0, noise, t), t, y), noise)
        for g in opt.param_groups:
            g["lr"] = lr_at(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(ema_decay, (1 + i) / (10 + i))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if i % 100 == 99:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / 100:.4f}")
    seconds = time.perf_counter() - start
    meta = dict(
        config=DIT_CONFIG, seed=seed, steps=steps, batch=batch, lr=lr, ema_decay=ema_decay,
        final_loss=sum(losses[-100:]) / min(100, len(losses)), train_seconds=round(seconds, 1),
        threads=torch.get_num_threads(), torch=torch.__version__, machine=platform.machine(),
        data="sklearn.datasets.load_digits, x / 8 - 1", schedule="DiT linear, 1000 steps",
    )  # fmt: skip
    return ema.eval(), meta


def train_classifier(epochs: int, seed: int) -> tuple[torch.nn.Module, dict]:
    x_all, y_all = load_digit_images()
    train, test = split_indices(len(x_all))
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in train[torch.randperm(len(train))].split(64):
            x = x_all[idx]
            # one-pixel random shifts: a feature space that does not hinge on exact placement
            dx, dy = torch.randint(-1, 2, (2,)).tolist()
            x = torch.roll(x, (dy, dx), (2, 3))
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_all[test]).argmax(1) == y_all[test]).float().mean().item()
    meta = dict(seed=seed, epochs=epochs, feature_dim=64, test_accuracy=round(acc, 4), split_seed=0,
                train_seconds=round(time.perf_counter() - start, 1), torch=torch.__version__)  # fmt: skip
    return model, meta


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", action="store_true", help="train the evaluation classifier instead")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy machine)")
    p.add_argument("--out", type=Path, default=None, help="output path (default: examples/assets/...)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.classifier:
        model, meta = train_classifier(args.epochs, args.seed)
        path = args.out or CLASSIFIER_PATH
    else:
        model, meta = train_dit(args.steps, args.batch, args.lr, args.seed, args.ema)
        path = args.out or DIT_PATH
    save_checkpoint(model, path, meta)
    print(f"saved {path}: {meta}")


if __name__ == "__main__":
    main()
