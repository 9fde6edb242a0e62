"""The main job: the seed monograph's experiment, torch.optim and fastopt side by side.

The 2019 monograph trained one network with PyTorch's SGD and Adam and compared loss and
accuracy curves. Here the same network, data order and settings are trained twice per optimizer,
once with ``torch.optim`` and once with ``fastopt``, and the two runs must agree at every
iteration up to float rounding. Nothing can be downloaded on these machines, so instead of the
seed's pretrained ResNet-18 on Kaggle's cats and dogs it uses real images that ship with
scikit-learn (the 1,797 8x8 handwritten digits) and a small CNN.

    python -m fastopt.demo [--optimizers SGD Adam AdamW] [--epochs 10] [--device cpu|cuda]

Prints, per optimizer, best validation accuracy, final training loss, the largest |loss
difference| between the two libraries over all iterations, time per epoch, optimizer step time
and the speedup; saves one figure per optimizer under ``--results`` (training loss per
iteration, validation loss and accuracy per epoch, both libraries overlaid); and runs
``fastopt.verify`` on the same model for a per-parameter check.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

import fastopt

LEARNING_RATES = {"SGD": 1e-3, "Adam": 1e-3, "AdamW": 1e-3}  # the seed's settings


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool and two linear layers: 8x8 digits -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
                                        nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def load_digits_split(seed: int = 0, val_fraction: float = 0.2):
    """scikit-learn's digits as (1, 8, 8) float images in [0, 1]; a fixed train/val split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(x) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(library, optimizer_name: str, data, args, device: torch.device, **options) -> dict:
    """One run: the same initial weights and batch order for every library."""
    from tqdm import tqdm

    (x_train, y_train), (x_val, y_val) = data
    torch.manual_seed(args.seed)
    model = DigitsCNN().to(device)
    lr = args.lr if args.lr is not None else LEARNING_RATES[optimizer_name]
    optimizer = getattr(library, optimizer_name)(model.parameters(), lr=lr, **options)
    order_gen = torch.Generator().manual_seed(args.seed)
    history = dict(train_loss=[], val_loss=[], val_acc=[], epoch_time=[], step_time=[])
    label = f"{optimizer_name} {'fastopt' if library is fastopt else 'torch.optim'}"
    label += " fused" if options.get("fused") else ""
    for _ in tqdm(range(args.epochs), desc=f"{label:<20}", leave=False):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(x_train), generator=order_gen)
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            x, y = x_train[idx].to(device), y_train[idx].to(device)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            synchronize(device)
            step_start = time.perf_counter()
            optimizer.step()
            synchronize(device)
            history["step_time"].append(time.perf_counter() - step_start)
            history["train_loss"].append(loss.item())
        history["epoch_time"].append(time.perf_counter() - start)
        model.eval()
        total_loss, correct = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(x_val), args.val_batch_size):
                x = x_val[i : i + args.val_batch_size].to(device)
                y = y_val[i : i + args.val_batch_size].to(device)
                out = model(x)
                total_loss += nn.functional.cross_entropy(out, y, reduction="sum").item()
                correct += (out.argmax(1) == y).sum().item()
        history["val_loss"].append(total_loss / len(x_val))
        history["val_acc"].append(correct / len(x_val))
    return history


def plot(optimizer_name: str, runs: dict, results_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, history, style in (("torch.optim", runs["torch"], "-"),
                                  ("fastopt", runs["fastopt"], "--")):
        axes[0].plot(history["train_loss"], style, label=label, linewidth=1)
        epochs = range(1, len(history["val_loss"]) + 1)
        axes[1].plot(epochs, history["val_loss"], style, marker="o", label=label)
        axes[2].plot(epochs, history["val_acc"], style, marker="o", label=label)
    for ax, title, xlabel in ((axes[0], "training loss", "iteration"),
                              (axes[1], "validation loss", "epoch"),
                              (axes[2], "validation accuracy", "epoch")):
        ax.set_title(f"{optimizer_name}: {title}")
        ax.set_xlabel(xlabel)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(results_dir, f"{optimizer_name.lower()}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def median(values: list) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="The seed's experiment: a small CNN on scikit-learn digits trained with "
                    "torch.optim and with fastopt (SGD, Adam, AdamW), side by side.")
    parser.add_argument("--optimizers", nargs="+", default=["SGD", "Adam", "AdamW"],
                        choices=["SGD", "Adam", "AdamW"], help="which optimizers to run")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--val-batch-size", type=int, default=16, help="validation batch size")
    parser.add_argument("--seed", type=int, default=0, help="weights, split and batch order")
    parser.add_argument("--results", default="results", help="folder for the PNG figures")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate for every optimizer (default: the seed's 1e-3)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    os.makedirs(args.results, exist_ok=True)
    data = load_digits_split(args.seed)
    print(f"digits: {len(data[0][0])} training and {len(data[1][0])} validation images, "
          f"device {device}, {args.epochs} epochs, batch {args.batch_size}/{args.val_batch_size}")
    header = (f"{'optimizer':<9} {'library':<18} {'best val acc':>12} {'final loss':>11} "
              f"{'max |dloss|':>12} {'s/epoch':>8} {'step ms':>8} {'speedup':>8}")
    rows, worst = [], 0.0
    for name in args.optimizers:
        runs = {"torch": train(torch.optim, name, data, args, device),
                "fastopt": train(fastopt, name, data, args, device),
                "torch-fused": train(torch.optim, name, data, args, device, fused=True)}
        step_ref = median(runs["torch"]["step_time"])
        for library, label in (("torch", "torch.optim"), ("fastopt", "fastopt"),
                               ("torch-fused", "torch.optim fused")):
            h = runs[library]
            diff = max(abs(a - b) for a, b in zip(runs["torch"]["train_loss"], h["train_loss"]))
            if library == "fastopt":
                worst = max(worst, diff)
            step = median(h["step_time"])
            rows.append(f"{name:<9} {label:<18} {max(h['val_acc']):12.2%} "
                        f"{h['train_loss'][-1]:11.4f} {diff:12.2e} "
                        f"{median(h['epoch_time']):8.3f} {step * 1e3:8.3f} "
                        f"{step_ref / step:7.2f}x")
        plot(name, runs, args.results)
    print(header)
    print("\n".join(rows))
    print(f"max |dloss|: the largest |loss difference| from torch.optim's default run over all "
          f"{len(runs['torch']['train_loss'])} iterations; torch's own fused=True row shows how "
          f"far float rounding alone carries a run. Figures: {args.results}/<optimizer>.png")

    from fastopt.verify import digits_spec, verify

    model, loss_fn, batches = digits_spec(args.batch_size, args.seed)
    report = verify(model.to(device), loss_fn,
                    [(x.to(device), y.to(device)) for x, y in batches],
                    fastopt.AdamW, lr=1e-3, steps=20)
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
