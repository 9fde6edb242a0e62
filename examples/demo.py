"""The main job: the seed monograph's experiment, every optimizer, torch.optim and fastopt
side by side.

The 2019 monograph trained one network with PyTorch's SGD and Adam and compared loss and
accuracy curves. Here the same network, data order and settings are trained with each of
fastopt's optimizers and with its reference (torch.optim's for-loop; lion-pytorch for Lion;
torch.optim.Muon with torch.optim.AdamW for Muon and its AdamW group),
and the two runs must agree at every iteration up to float rounding. Nothing can be downloaded
on these machines, so instead of the seed's pretrained ResNet-18 on Kaggle's cats and dogs it
uses real images that ship with scikit-learn (the 1,797 8x8 handwritten digits) and a small CNN.
Each optimizer trains with a learning rate that suits it (``SETTINGS``): SGD at the seed's 1e-3
without momentum does not leave chance level in a few epochs.

    python -m examples.demo [--optimizers SGD NAdam Lion] [--epochs 5] [--device cpu|cuda]

Prints, per optimizer, best validation accuracy, final training loss, the largest |loss
difference| from the reference over all iterations, time per epoch, optimizer step time and
the speedup; saves one figure per optimizer under ``--results`` (training loss per iteration,
validation loss and accuracy per epoch, overlaid); and runs ``fastopt.verify`` on the same model
for a per-parameter check.
"""

from __future__ import annotations

import argparse
import inspect
import os
import time

import torch
from torch import nn

import fastopt
from fastopt import registry

# Each optimizer's settings for this CNN (the seed used lr=1e-3 for SGD and Adam alike).
SETTINGS = {
    "SGD": dict(lr=0.05, momentum=0.9),
    "Adam": dict(lr=1e-3),
    "AdamW": dict(lr=1e-3),
    "AdamW8bit": dict(lr=1e-3),
    "NAdam": dict(lr=2e-3),
    "RAdam": dict(lr=1e-2),
    "Adamax": dict(lr=2e-3),
    "Adagrad": dict(lr=1e-2),
    "RMSprop": dict(lr=1e-3),
    "Adadelta": dict(lr=1.0),
    "ASGD": dict(lr=0.2),
    "Rprop": dict(lr=1e-3, step_sizes=(1e-6, 1e-2)),
    "Lion": dict(lr=1e-3, weight_decay=0.1),
    "Adafactor": dict(lr=1e-2),
    "Muon": dict(lr=0.02),  # its matrices; the rest in an AdamW group (param_groups)
}


def param_groups(name: str, model: nn.Module):
    """What the optimizer is given: the model's params, or for Muon its two linear layers'
    matrices and, in an AdamW group (lr 1e-3), the conv weights and every bias (torch's Muon,
    the reference, takes matrices only)."""
    if name != "Muon":
        return model.parameters()
    matrices = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    return [{"params": matrices}, {"params": rest, "use_muon": False, "lr": 1e-3}]


class TorchMuonWithAdamW:
    """The reference for fastopt.Muon with an AdamW group: torch.optim.Muon on the Muon group
    and torch.optim.AdamW (for-loop, or ``fused``) on the ``use_muon=False`` group, stepped
    together."""

    def __init__(self, groups, lr: float, fused: bool = False) -> None:
        muon = [g for g in groups if g.get("use_muon", True)]
        adamw = [{k: v for k, v in g.items() if k != "use_muon"} for g in groups
                 if not g.get("use_muon", True)]
        self.optimizers = [torch.optim.Muon(muon, lr=lr),
                           torch.optim.AdamW(adamw, foreach=False, fused=fused or None)]

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad()

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


def reference(name: str):
    """The class fastopt's ``name`` is checked against (None if it is not installed)."""
    if name == "Lion":
        try:
            import lion_pytorch
        except ImportError:
            return None
        return lion_pytorch.Lion
    if name == "AdamW8bit":  # AdamW with 8-bit moments: its losses follow fp32 AdamW's
        return torch.optim.AdamW
    if name == "Muon":
        return TorchMuonWithAdamW
    return getattr(torch.optim, name)


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


def train(cls, optimizer_name: str, label: str, data, args, device: torch.device,
          **options) -> dict:
    """One run: the same initial weights and batch order for every implementation."""
    from tqdm import tqdm

    (x_train, y_train), (x_val, y_val) = data
    torch.manual_seed(args.seed)
    model = DigitsCNN().to(device)
    settings = dict(SETTINGS[optimizer_name])
    if args.lr is not None:
        settings["lr"] = args.lr
    if cls is not getattr(fastopt, optimizer_name) and cls.__module__.startswith("torch."):
        options.setdefault("foreach", False)
    optimizer = cls(param_groups(optimizer_name, model), **settings, **options)
    order_gen = torch.Generator().manual_seed(args.seed)
    history = dict(train_loss=[], val_loss=[], val_acc=[], epoch_time=[], step_time=[])
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
    for label, history, style in (("reference", runs.get("reference"), "-"),
                                  ("fastopt", runs["fastopt"], "--")):
        if history is None:
            continue
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
    names = [n for n in registry.classes() if n in SETTINGS]
    parser = argparse.ArgumentParser(
        description="The seed's experiment: a small CNN on scikit-learn digits trained with "
                    "every fastopt optimizer and its reference, side by side.")
    parser.add_argument("--optimizers", nargs="+", default=names, choices=names,
                        help="which optimizers to run (default: all)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs per run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--val-batch-size", type=int, default=16, help="validation batch size")
    parser.add_argument("--seed", type=int, default=0, help="weights, split and batch order")
    parser.add_argument("--results", default="results", help="folder for the PNG figures")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate for every optimizer (default: each one's SETTINGS)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    os.makedirs(args.results, exist_ok=True)
    data = load_digits_split(args.seed)
    print(f"digits: {len(data[0][0])} training and {len(data[1][0])} validation images, "
          f"device {device}, {args.epochs} epochs, batch {args.batch_size}/{args.val_batch_size}")
    header = (f"{'optimizer':<9} {'run':<22} {'best val acc':>12} {'final loss':>11} "
              f"{'max |dloss|':>12} {'s/epoch':>8} {'step ms':>8} {'speedup':>8}")
    rows = []
    for name in args.optimizers:
        runs, labels = {}, {}
        ref_cls = reference(name)
        if ref_cls is not None:
            labels["reference"] = ("torch.optim.Muon+AdamW" if ref_cls is TorchMuonWithAdamW
                                   else f"{ref_cls.__module__.split('.')[0]}.{ref_cls.__name__}")
            runs["reference"] = train(ref_cls, name, labels["reference"], data, args, device)
        labels["fastopt"] = f"fastopt.{name}"
        runs["fastopt"] = train(getattr(fastopt, name), name, labels["fastopt"], data, args,
                                device)
        if ref_cls is not None and "fused" in inspect.signature(ref_cls).parameters \
                and name != "AdamW8bit":
            labels["fused"] = f"torch.optim.{name} fused"
            runs["fused"] = train(ref_cls, name, labels["fused"], data, args, device,
                                  fused=True)
        base = runs.get("reference", runs["fastopt"])
        step_ref = median(base["step_time"])
        for key, h in runs.items():
            diff = max(abs(a - b) for a, b in zip(base["train_loss"], h["train_loss"]))
            step = median(h["step_time"])
            rows.append(f"{name:<9} {labels[key]:<22} {max(h['val_acc']):12.2%} "
                        f"{h['train_loss'][-1]:11.4f} {diff:12.2e} "
                        f"{median(h['epoch_time']):8.3f} {step * 1e3:8.3f} "
                        f"{step_ref / step:7.2f}x")
        plot(name, runs, args.results)
        print(rows[-len(runs)], flush=True)
    print(header)
    print("\n".join(rows))
    print("max |dloss|: the largest |loss difference| from the reference's run over all "
          "iterations (AdamW8bit's reference is fp32 AdamW: its 8-bit moments differ by design); "
          "torch's own fused=True rows show how far float rounding alone carries a run. "
          f"Figures: {args.results}/<optimizer>.png")

    model, loss_fn, batches = digits_spec(args.batch_size, args.seed)
    report = fastopt.verify(model.to(device), loss_fn,
                            [(x.to(device), y.to(device)) for x, y in batches],
                            fastopt.AdamW, lr=1e-3, steps=20)
    print(report)
    return 0 if report.ok else 1


def digits_spec(batch_size: int = 32, seed: int = 0):
    """The demo's CNN on scikit-learn's digits: (model, loss_fn, batches), for
    ``fastopt.verify`` (``python -m fastopt.verify --model examples.demo:digits_spec``)."""
    torch.manual_seed(seed)
    (x_train, y_train), _ = load_digits_split(seed)
    batches = [(x_train[i : i + batch_size], y_train[i : i + batch_size])
               for i in range(0, len(x_train), batch_size)]

    def loss_fn(net, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(net(x), y)

    return DigitsCNN(), loss_fn, batches


if __name__ == "__main__":
    raise SystemExit(main())
