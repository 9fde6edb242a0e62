"""SAGA against SGD on L2-regularised softmax regression over scikit-learn's digits.

The objective is a finite sum, SAGA's home ground:
:math:`f(W, b) = \\frac1n \\sum_i \\mathrm{CE}(W x_i + b, y_i) + \\frac\\lambda2 \\|W\\|^2`
(pixels scaled to [0, 1], the bias not decayed). Its optimum comes from L-BFGS on the full
batch in fp64; then SAGA and plain SGD take one sample per step with the same learning rate, and
the table shows how far each is from the optimum after every epoch.

``python -m examples.saga_digits`` (a few seconds on a CPU).
"""

from __future__ import annotations

import argparse

import torch

import fastopt

L2 = 1e-2


def digits(dtype=torch.float32):
    """(x, y): the 1797 8x8 digits, pixels in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=dtype) / 16.0
    return x, torch.tensor(data.target)


def objective(weight, bias, x, y, l2: float = L2):
    logits = x @ weight.T + bias
    return torch.nn.functional.cross_entropy(logits, y) + 0.5 * l2 * weight.pow(2).sum()


def optimum(x, y, l2: float = L2) -> float:
    """The minimum of the objective, by full-batch L-BFGS in fp64."""
    x = x.double()
    weight = torch.zeros(10, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    lbfgs = torch.optim.LBFGS([weight, bias], lr=1, max_iter=500, tolerance_grad=1e-12,
                              tolerance_change=1e-15, history_size=50,
                              line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = objective(weight, bias, x, y, l2)
        loss.backward()
        return loss

    for _ in range(5):
        lbfgs.step(closure)
    with torch.no_grad():
        return objective(weight, bias, x, y, l2).item()


def train(name: str, x, y, lr: float, epochs: int, seed: int = 0, l2: float = L2,
          backend: str = "auto") -> list:
    """The objective after each epoch of one-sample steps ("saga" or "sgd"), starting at zero.
    Weight decay is the optimizer's (on the weight only), so both minimise the same f."""
    n = x.shape[0]
    weight = torch.nn.Parameter(torch.zeros(10, x.shape[1], dtype=x.dtype))
    bias = torch.nn.Parameter(torch.zeros(10, dtype=x.dtype))
    groups = [{"params": [weight], "weight_decay": l2}, {"params": [bias], "weight_decay": 0.0}]
    if name == "saga":
        opt = fastopt.SAGA(groups, lr=lr, num_samples=n, backend=backend)
    else:
        opt = fastopt.SGD(groups, lr=lr, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        for i in torch.randperm(n, generator=gen).tolist():
            opt.zero_grad()
            logits = x[i] @ weight.T + bias
            torch.nn.functional.cross_entropy(logits[None], y[i : i + 1]).backward()
            if name == "saga":
                opt.step(index=i)
            else:
                opt.step()
        with torch.no_grad():
            history.append(objective(weight, bias, x, y, l2).item())
    return history


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.saga_digits", description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args(argv)
    x, y = digits()
    best = optimum(x, y)
    runs = {name: train(name, x, y, args.lr, args.epochs) for name in ("saga", "sgd")}
    print(f"softmax regression on digits (n={x.shape[0]}, l2={L2}), lr={args.lr}, "
          f"one sample per step; optimum f* = {best:.6f} (L-BFGS, fp64)")
    print("epoch   SAGA f - f*   SGD f - f*")
    for epoch in range(args.epochs):
        print(f"{epoch + 1:5d}   {runs['saga'][epoch] - best:11.2e}   "
              f"{runs['sgd'][epoch] - best:10.2e}")


if __name__ == "__main__":
    main()
