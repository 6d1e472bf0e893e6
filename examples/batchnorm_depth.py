"""The lecture's batch-normalisation experiment, with fusedmlp and torch side by side.

"Deep MLP on a 2d 'disc' toy example, with naive Gaussian weight initialization, cross-entropy,
standard SGD, eta = 0.1": a depth-16, width-32 ReLU MLP (the lecture's ``create_model``), every
Linear's weight and bias drawn from N(0, std^2) for several stds, trained with and without
BatchNorm1d. Without BatchNorm the activations vanish or explode through the 18 layers unless the
std is just right; with it, training works across the whole range.

The torch model is the lecture's ``nn.Sequential``; the fusedmlp model is
``fusedmlp.nn.convert`` of the very same initial model (its ReLUs after Linears fuse into them),
trained with ``fusedmlp.optim.SGD``; both see the same batches.

    python examples/batchnorm_depth.py                      # the accuracy table (~30 s on CPU)
    python examples/batchnorm_depth.py --plot bn_depth.png  # and a plot (needs matplotlib)
"""

from __future__ import annotations

import argparse
import math
import time

import torch

# run as a script, this file's folder is first on sys.path
from _common import (
    FINITE_NONNEGATIVE,
    FINITE_POSITIVE,
    add_run_options,
    at_least,
    exit_on_out_of_memory,
    pyplot,
    save_figure,
    set_up,
)

import fusedmlp


def create_model(with_batchnorm: bool, nc: int = 32, depth: int = 16) -> torch.nn.Sequential:
    """The lecture's model, verbatim."""
    nn = torch.nn
    modules = []
    modules.append(nn.Linear(2, nc))
    if with_batchnorm:
        modules.append(nn.BatchNorm1d(nc))
    modules.append(nn.ReLU())
    for _ in range(depth):
        modules.append(nn.Linear(nc, nc))
        if with_batchnorm:
            modules.append(nn.BatchNorm1d(nc))
        modules.append(nn.ReLU())
    modules.append(nn.Linear(nc, 2))
    return nn.Sequential(*modules)


def naive_gaussian_init_(model: torch.nn.Module, std: float) -> None:
    """Every Linear's weight and bias ~ N(0, std^2) (BatchNorm keeps gamma = 1, beta = 0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.normal_(0.0, std)


def generate_disc_set(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Points uniform in [-1, 1]^2; label 1 inside the disc of radius sqrt(2/pi) (half the area)."""
    x = torch.empty(n, 2).uniform_(-1.0, 1.0, generator=generator)
    y = (x.pow(2).sum(1) < 2.0 / math.pi).long()
    return x, y


def train(
    model, loss_fn, optimizer, x, y, epochs, batch_size, order_seed, min_batch: int = 2
) -> float:
    """Plain minibatch SGD; returns the last epoch's mean loss (NaN when it diverged). An
    epoch's last batch is left out when it has fewer than ``min_batch`` samples (BatchNorm
    refuses a batch of 1 in training)."""
    gen = torch.Generator().manual_seed(order_seed)
    model.train()
    last = float("nan")
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        total = torch.zeros((), device=x.device)
        steps = 0
        for i in range(0, len(x) - min_batch + 1, batch_size):
            idx = perm[i : i + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.detach()
            steps += 1
        last = (total / steps).item()
    return last


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--stds", type=FINITE_NONNEGATIVE, nargs="+", default=[0.001, 0.01, 0.1, 0.25, 1.0, 10.0]
    )
    p.add_argument("--depth", type=at_least(0), default=16)
    p.add_argument("--width", type=at_least(1), default=32)
    p.add_argument("--epochs", type=at_least(1), default=25)
    # BatchNorm needs batches of at least 2 samples
    p.add_argument("--batch-size", type=at_least(2), default=100)
    p.add_argument("--lr", type=FINITE_POSITIVE, default=0.1)
    p.add_argument("--n", type=at_least(2), default=1000, help="train and test set sizes")
    add_run_options(p, "PNG of test accuracy against the init std")
    args = p.parse_args(argv)
    device = set_up(p, args)
    exit_on_out_of_memory(
        p,
        device,
        f"--n {args.n}, --width {args.width}, --depth {args.depth}",
        lambda: _experiment(args, device),
    )


def _experiment(args, device) -> None:
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = (t.to(device) for t in generate_disc_set(args.n, gen))
    x_test, y_test = (t.to(device) for t in generate_disc_set(args.n, gen))
    print(
        f"disc: {args.n} train / {args.n} test points; MLP depth {args.depth} width {args.width}, "
        f"naive N(0, std^2) init, cross-entropy, SGD lr {args.lr}, {args.epochs} epochs of "
        f"batches of {args.batch_size}, on {device} (fusedmlp backend {fusedmlp.get_backend()})"
    )
    columns = [(bn, lib) for bn in (False, True) for lib in ("torch", "fusedmlp")]
    results = {col: [] for col in columns}
    start = time.perf_counter()
    for std in args.stds:
        for bn in (False, True):
            torch.manual_seed(args.seed)
            reference = create_model(bn, args.width, args.depth)
            naive_gaussian_init_(reference, std)
            reference.to(device)
            fused = fusedmlp.nn.convert(reference)  # a converted copy: same initial weights
            for lib, model in (("torch", reference), ("fusedmlp", fused)):
                if lib == "torch":
                    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
                    loss_fn = torch.nn.CrossEntropyLoss()
                else:
                    opt = fusedmlp.optim.SGD(model.parameters(), lr=args.lr)
                    loss_fn = fusedmlp.nn.CrossEntropyLoss()
                torch.manual_seed(args.seed)
                train(
                    model, loss_fn, opt, x_train, y_train, args.epochs, args.batch_size, args.seed
                )
                results[(bn, lib)].append(accuracy(model, x_test, y_test))
    elapsed = time.perf_counter() - start

    header = f"{'weight std':>10} |" + "".join(
        f" {lib + (' BN' if bn else ' no BN'):>14}" for bn, lib in columns
    )
    print("\ntest accuracy (50% = chance)")
    print(header)
    print("-" * len(header))
    for i, std in enumerate(args.stds):
        print(f"{std:>10g} |" + "".join(f" {100 * results[col][i]:>13.1f}%" for col in columns))
    print(f"({elapsed:.1f} s)")

    if args.plot is not None:
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        styles = {"torch": "-", "fusedmlp": "--"}
        for bn, lib in columns:
            ax.plot(
                args.stds,
                [100 * a for a in results[(bn, lib)]],
                styles[lib],
                marker="o",
                label=f"{lib}, {'with' if bn else 'without'} BatchNorm",
            )
        ax.set_xscale("log")
        ax.set_xlabel("std of the naive Gaussian initialisation")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"disc, MLP depth {args.depth} width {args.width}, SGD lr {args.lr}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
