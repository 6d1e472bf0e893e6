"""The lecture's universal-approximation example, with fusedmlp and torch side by side.

"Consider the 1-layer MLP f(x) = sum_i w_i ReLU(x + b_i). This model can approximate any smooth
1D function, provided enough hidden units." Here a one-hidden-layer ReLU MLP, Linear(1, q) ->
ReLU -> Linear(q, 1), fits the smooth target f(x) = sin(x) + 0.3 sin(3x) on [-3, 3] (the first
two terms of a square wave's Fourier series: a steep rise through 0 between two rippled
plateaus) from N noisy samples y = f(x) + noise, for q = 1, 2, 4, ..., 64 hidden units, trained
full-batch with Adam on the mean squared error. The test error is measured against f itself on
an even grid of held-out points: the mean integrated square error of Barron's bound,
O(C_f^2 / q + (q p / N) log N).

What the default run shows (seed 0, on a CPU): the first term, approximation, falls with q. The
test error goes from 0.57 at q = 1 (its single unit dies, as the lecture's ReLUs may: its kink
leaves the interval and the fit is a constant, whose error is f's variance; with about half the
seeds it survives, at about 0.12) to 1.4e-2 at q = 2 (a rise between two plateaus), stays near
1.2e-2 up to q = 8 (Adam leaves the ripples unfitted), then falls to 5.9e-3, 4.4e-3 and 1.0e-3
at q = 16, 32, 64. The train error, against noisy targets, stops at the noise's variance (0.01).
The second term, estimation, grows with q / N: with ``--n 20`` the test error is lowest at q = 2
(1.6e-2), 2 to 4.5 times that at q = 4, 8, 16 and 64 (q = 32 is back at 1.4e-2), while the train
errors of the larger q fall below the noise's variance (they fit the noise and guess between the
points); ``--n 20 --noise 0.3`` makes it clearer (from 2.8e-2 at q = 2 up to 8.6e-2 at q = 64).

Each hidden unit starts as a term of the lecture's sum, ReLU(+-x + b_i), its kink -b_i drawn
uniformly over the interval (its sign lets a unit face either way); the output layer keeps
torch's initialisation, and training moves everything. The torch model is that ``nn.Sequential``;
the fusedmlp model is ``fusedmlp.nn.convert`` of the very same initial model (the ReLU fuses into
the first Linear), trained with ``fusedmlp.optim.Adam`` against ``torch.optim.Adam``; both use
``torch.nn.functional.mse_loss`` (fusedmlp has no loss of its own for regression). On CUDA (or
with the 'triton' backend and ``TRITON_INTERPRET=1`` on a CPU) fusedmlp's kernels run; on a CPU
with the default backend, its torch fallback does (and gives torch's numbers exactly).

    python examples/universal_approximation.py                 # the table (~10 s on a CPU)
    python examples/universal_approximation.py --n 20          # Barron's second term
    python examples/universal_approximation.py --plot ua.png   # and the fits (needs matplotlib)
"""

from __future__ import annotations

import argparse
import time

import torch

# run as a script, this file's folder is first on sys.path
from _common import (
    FINITE_NONNEGATIVE,
    FINITE_POSITIVE,
    LIBRARIES,
    add_run_options,
    exit_on_out_of_memory,
    pyplot,
    rel_diff,
    save_figure,
    set_up,
)

import fusedmlp
from fusedmlp.cli._checks import positive_c_int
from fusedmlp.cli.train import checked_type

INTERVAL = (-3.0, 3.0)


def target(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) + 0.3 * torch.sin(3.0 * x)


def make_data(n: int, noise: float, test_points: int, generator: torch.Generator):
    """``n`` noisy training samples at uniform points of the interval, and the held-out grid of
    ``test_points`` points with the target's exact values."""
    lo, hi = INTERVAL
    x = torch.empty(n, 1).uniform_(lo, hi, generator=generator)
    y = target(x) + noise * torch.randn(n, 1, generator=generator)
    x_test = torch.linspace(lo, hi, test_points).unsqueeze(1)
    return x, y, x_test, target(x_test)


def create_model(q: int) -> torch.nn.Sequential:
    """Linear(1, q) -> ReLU -> Linear(q, 1), each hidden unit ReLU(+-x + b_i) with its kink
    uniform over the interval. torch's default init would put the kinks -b/w (a ratio of two
    U(-1, 1) draws) mostly near 0: units whose kink lies outside the interval are linear (or dead)
    over all of it, and the fits of the small q would depend on luck more than on q."""
    nn = torch.nn
    model = nn.Sequential(nn.Linear(1, q), nn.ReLU(), nn.Linear(q, 1))
    lo, hi = INTERVAL
    with torch.no_grad():
        sign = torch.randint(0, 2, (q, 1)).float() * 2 - 1
        kink = torch.empty(q).uniform_(lo, hi)
        model[0].weight.copy_(sign)
        model[0].bias.copy_(-sign[:, 0] * kink)
    return model


def fit(model, optimizer, x, y, steps: int) -> None:
    """Full-batch training on the mean squared error."""
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def evaluate(model, x, y) -> tuple[float, torch.Tensor]:
    """The MSE on ``(x, y)`` and the predictions (on the CPU)."""
    model.eval()
    with torch.no_grad():
        pred = model(x)
        return torch.nn.functional.mse_loss(pred, y).item(), pred.cpu()


def main(argv=None):
    """Runs the experiment; returns its rows, one a q: ``(q, {"fusedmlp": (train MSE, test MSE),
    "torch": (...)}, {"fusedmlp": test-grid predictions, "torch": ...})``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--units",
        type=positive_c_int,  # a Linear's width reaches torch as a C int
        nargs="+",
        default=[1, 2, 4, 8, 16, 32, 64],
        help="hidden-unit counts q",
    )
    p.add_argument(
        "--steps",
        type=checked_type(int, lambda v: 1 <= v <= 1_000_000, "an integer in [1, 1000000]"),
        default=1000,
        help="full-batch Adam steps",
    )
    p.add_argument("--n", type=positive_c_int, default=200, help="training points N")
    p.add_argument(
        "--test-points",
        type=positive_c_int,
        default=1000,
        help="held-out points: an even grid over the interval",
    )
    p.add_argument(
        "--noise",
        type=FINITE_NONNEGATIVE,
        default=0.1,
        help="std of the Gaussian noise on the training targets",
    )
    p.add_argument("--lr", type=FINITE_POSITIVE, default=0.02)
    add_run_options(p, "PNG of the fits and of the errors against q")
    args = p.parse_args(argv)
    device = set_up(p, args)
    return exit_on_out_of_memory(
        p,
        device,
        f"--n {args.n}, --test-points {args.test_points}, --units {max(args.units)}",
        lambda: _experiment(args, device),
    )


def _experiment(args, device):
    gen = torch.Generator().manual_seed(args.seed)
    x, y, x_test, y_test = (
        t.to(device) for t in make_data(args.n, args.noise, args.test_points, gen)
    )
    lo, hi = INTERVAL
    print(
        f"f(x) = sin(x) + 0.3 sin(3x) on [{lo:g}, {hi:g}]: N = {args.n} training points with "
        f"noise std {args.noise:g}, test on a grid of {args.test_points} points against f itself; "
        f"Linear(1, q) -> ReLU -> Linear(q, 1), full-batch Adam lr {args.lr:g}, {args.steps} "
        f"steps, on {device} (fusedmlp backend {fusedmlp.get_backend()})"
    )
    rows = []
    start = time.perf_counter()
    for q in args.units:
        torch.manual_seed(args.seed)
        reference = create_model(q).to(device)
        fused = fusedmlp.nn.convert(reference)  # a converted copy: same initial weights
        errors, preds = {}, {}
        for lib, model in (("fusedmlp", fused), ("torch", reference)):
            opt = LIBRARIES[lib].optim.Adam(model.parameters(), lr=args.lr)
            fit(model, opt, x, y, args.steps)
            train_mse, _ = evaluate(model, x, y)
            test_mse, preds[lib] = evaluate(model, x_test, y_test)
            errors[lib] = (train_mse, test_mse)
        rows.append((q, errors, preds))
    elapsed = time.perf_counter() - start

    header = (
        f"{'q':>6} | {'train MSE fusedmlp':>18} {'torch':>10} | "
        f"{'test MSE fusedmlp':>17} {'torch':>10} | {'max rel diff':>12}"
    )
    floor = f" (the noise's variance, {args.noise**2:.3g}, is its floor)" if args.noise else ""
    print(f"\ntrain MSE: against the noisy targets{floor}; test MSE: against f")
    print(header)
    print("-" * len(header))
    for q, errors, _ in rows:
        (ours_train, ours_test), (torch_train, torch_test) = errors["fusedmlp"], errors["torch"]
        gap = max(rel_diff(ours_train, torch_train), rel_diff(ours_test, torch_test))
        print(
            f"{q:>6} | {ours_train:>18.4e} {torch_train:>10.4e} | "
            f"{ours_test:>17.4e} {torch_test:>10.4e} | {gap:>12.2g}"
        )
    print(f"({elapsed:.1f} s)")

    if args.plot is not None:
        _plot(args, rows, x.cpu(), y.cpu(), x_test.cpu(), y_test.cpu())
    return rows


def _plot(args, rows, x, y, x_test, y_test) -> None:
    plt = pyplot()

    fig, (ax, ax_err) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    ax.plot(x_test[:, 0], y_test[:, 0], "k-", lw=2.5, alpha=0.3, label="f")
    ax.plot(x[:, 0], y[:, 0], "k.", ms=3, label=f"{len(x)} training points")
    # a few q spread over the list: all of them would hide each other
    shown = sorted({0, len(rows) // 3, 2 * len(rows) // 3, len(rows) - 1})
    for color, i in enumerate(shown):
        q, _, preds = rows[i]
        ax.plot(x_test[:, 0], preds["torch"][:, 0], "-", color=f"C{color}", label=f"q = {q}")
        ax.plot(x_test[:, 0], preds["fusedmlp"][:, 0], "--", color=f"C{color}")
    ax.set_xlabel("x")
    ax.set_title("fits (torch solid, fusedmlp dashed)")
    ax.legend(fontsize=7)

    qs = [q for q, _, _ in rows]
    for lib, style in (("torch", "-"), ("fusedmlp", "--")):
        for j, (what, marker) in enumerate((("train", "o"), ("test", "s"))):
            ax_err.plot(
                qs,
                [errors[lib][j] for _, errors, _ in rows],
                style,
                marker=marker,
                # hollow and larger: equal errors would hide one library's markers
                markerfacecolor="none" if lib == "fusedmlp" else None,
                markersize=9 if lib == "fusedmlp" else 5,
                color=f"C{j}",
                label=f"{lib}, {what} MSE",
            )
    ax_err.set_xscale("log", base=2)
    ax_err.set_yscale("log")
    ax_err.set_xlabel("hidden units q")
    ax_err.set_title(f"N = {args.n}, noise std {args.noise:g}, Adam {args.steps} steps")
    ax_err.grid(True, alpha=0.3)
    ax_err.legend(fontsize=7)
    save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
