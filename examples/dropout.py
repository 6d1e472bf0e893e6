"""The lecture's dropout examples, with fusedmlp's and torch's Dropout side by side.

First its REPL session: ``x`` = ones(3, 9) requiring grad, ``dropout = nn.Dropout(p=0.75)``,
``y = dropout(x)`` (each entry 0, or 1/(1-p) = 4 where kept), ``l = y.norm(2, 1).sum()``,
``l.backward()``; then ``x.grad``, which is 4 y / ||y_row|| on the kept entries (4 / sqrt(k) for
k kept in the row) and 0 where dropped. It runs with ``fusedmlp.nn.Dropout`` and with
``torch.nn.Dropout``, and checks each against that closed form: on the Triton path the kernels
draw their own random numbers, so the two masks differ (on a CPU with the default backend,
fusedmlp's torch fallback draws torch's mask). Then the lecture's ``model.train(False)``, which
turns dropout off: the output is the input. Then its "Spatial Dropout" session:
``dropout2d = nn.Dropout2d()`` on ``x = Tensor(2, 3, 2, 2).fill_(1.0)``, which drops whole
channels: each of the 6 channels of ``dropout2d(x)`` is all 0 or all 2, checked for
``fusedmlp.nn.Dropout2d`` and ``torch.nn.Dropout2d``.

Then "A bit of Dropout: MLP with 3 hidden layers and noisy labels" and "Too much: underfitting":
the lecture's 2-D disc problem with a fraction of the training labels flipped, and an MLP with 3
hidden layers (Linear-ReLU-Dropout(p) x 3, then Linear) trained with Adam for each p. Without
dropout it memorises the flipped labels (train accuracy on the noisy labels above the 1 - noise
that the clean disc scores, test accuracy on clean labels lower); a moderate p keeps it near the
disc; too large a p underfits both. The fusedmlp model is ``fusedmlp.nn.convert`` of the very
same initial torch model (its Linear-ReLU-Dropout blocks fuse), trained with
``fusedmlp.optim.Adam`` on the same batches; with p = 0 nothing is random and both give the same
accuracies.

    python examples/dropout.py                        # the checks and the table (~15 s on CPU)
    python examples/dropout.py --plot dropout.png     # and a plot (needs matplotlib)
"""

from __future__ import annotations

import argparse
import math
import time
from typing import NamedTuple

import torch

# run as a script, this file's folder is first on sys.path
from _common import (
    FINITE_POSITIVE,
    LIBRARIES,
    LIBS,
    add_run_options,
    at_least,
    exit_if_failed,
    exit_on_out_of_memory,
    pyplot,
    save_figure,
    set_up,
)
from batchnorm_depth import accuracy, generate_disc_set, train

import fusedmlp
from fusedmlp.cli._checks import positive_c_int
from fusedmlp.cli.train import checked_type

# x.grad divides by a float32 norm (4 / sqrt(k)): a few ulps from the closed form, not exact
GRAD_TOLERANCE = 1e-5


class ReplResult(NamedTuple):
    """What the lecture's REPL session gave with one library's ``nn.Dropout``."""

    y: torch.Tensor
    grad: torch.Tensor
    expected_grad: torch.Tensor  # the closed form, from y
    values_ok: bool  # every entry of y is 0 or 1/(1-p)
    grad_error: float  # max |x.grad - closed form|
    off_in_eval: bool  # model.train(False) cleared dropout.training, and dropout(x) is x there

    @property
    def ok(self) -> bool:
        return self.values_ok and self.grad_error <= GRAD_TOLERANCE and self.off_in_eval


def repl_example(lib, device, p: float = 0.75, seed: int = 0) -> ReplResult:
    """The lecture's session with ``lib.nn.Dropout`` (``lib``: fusedmlp or torch)."""
    torch.manual_seed(seed)
    x = torch.ones(3, 9, device=device, requires_grad=True)
    dropout = lib.nn.Dropout(p=p)
    y = dropout(x)
    l = y.norm(2, 1).sum()  # noqa: E741 (the lecture's name)
    l.backward()

    y = y.detach()
    scale = 1.0 / (1.0 - p)
    norms = y.norm(2, 1, keepdim=True)
    # d||y_i|| / dy_ij = y_ij / ||y_i||, times dy_ij / dx_ij = scale where kept; a row with
    # nothing kept has norm 0, where torch's norm backward gives 0 (not the NaN of 0 / 0)
    expected = torch.where(y != 0, scale * y / norms, torch.zeros_like(y))
    values_ok = bool(((y == 0) | (y == scale)).all())
    grad_error = (x.grad - expected).abs().max().item()

    dropout = lib.nn.Dropout()
    model = torch.nn.Sequential(lib.nn.Linear(3, 10), dropout, lib.nn.Linear(10, 3)).to(device)
    was_training = dropout.training
    model.train(False)
    z = torch.randn(4, 10, device=device)
    off_in_eval = was_training and not dropout.training and torch.equal(dropout(z), z)
    return ReplResult(y, x.grad.detach(), expected, values_ok, grad_error, off_in_eval)


def _rows(t: torch.Tensor, fmt: str) -> str:
    return "\n".join(" ".join(format(v, fmt) for v in row) for row in t.cpu().tolist())


def print_repl(device, p: float, seed: int) -> dict[str, ReplResult]:
    results = {}
    scale = 1.0 / (1.0 - p)
    for name in LIBS:
        lib = LIBRARIES[name]
        r = results[name] = repl_example(lib, device, p, seed)
        print(f"\n>>> dropout = {name}.nn.Dropout(p = {p:g}); y = dropout(x)  (x = ones(3, 9))")
        print(_rows(r.y, ".0f" if scale.is_integer() else ".4g"))
        print(">>> l = y.norm(2, 1).sum(); l.backward(); x.grad")
        print(_rows(r.grad, "6.4f"))
        kept = int(r.y.count_nonzero())
        grad_ok = r.values_ok and r.grad_error <= GRAD_TOLERANCE
        print(
            f"check {name}: y in {{0, {scale:g}}}: {'yes' if r.values_ok else 'NO'} "
            f"({kept}/{r.y.numel()} kept); x.grad vs {scale:g} y / ||y_row|| (0 where dropped): "
            f"max |diff| {r.grad_error:.2g} -> {'OK' if grad_ok else 'FAILED'}"
        )
        print(
            f"check {name}: model.train(False) turns dropout off, output == input: "
            f"{'yes' if r.off_in_eval else 'NO'} -> {'OK' if r.off_in_eval else 'FAILED'}"
        )
    same = torch.equal(results["fusedmlp"].y, results["torch"].y)
    why = (
        "fusedmlp's torch fallback draws torch's mask"
        if same
        else "fusedmlp's Triton kernels draw their own random numbers"
    )
    print(f"same mask in both libraries: {'yes' if same else 'no'} ({why})")
    return results


class SpatialResult(NamedTuple):
    """What the lecture's Spatial Dropout session gave with one library's ``nn.Dropout2d``."""

    y: torch.Tensor
    scale: float  # 1/(1-p), a kept channel's value
    whole_channels: bool  # every (sample, channel) map is all 0 or all 1/(1-p)
    kept: int  # channels kept, of y.shape[0] * y.shape[1]

    @property
    def ok(self) -> bool:
        return self.whole_channels


def spatial_dropout_example(
    lib, device, shape=(2, 3, 2, 2), p: float = 0.5, seed: int = 0
) -> SpatialResult:
    """``lib.nn.Dropout2d(p)`` on ones of ``shape`` (``lib``: fusedmlp or torch)."""
    torch.manual_seed(seed)
    dropout2d = lib.nn.Dropout2d(p)
    x = torch.ones(shape, device=device)
    y = dropout2d(x)
    scale = 1.0 / (1.0 - p)
    maps = y.flatten(2)  # [sample, channel, H * W]
    dropped, kept = (maps == 0).all(2), (maps == scale).all(2)
    whole = bool((dropped | kept).all())
    return SpatialResult(y, scale, whole, int(kept.sum()))


def print_spatial(device, seed: int) -> dict[str, SpatialResult]:
    """The lecture's Spatial Dropout session with each library: every channel all 0 or all 2."""
    results = {}
    for name in LIBS:
        lib = LIBRARIES[name]
        r = results[name] = spatial_dropout_example(lib, device, seed=seed)
        print(
            f"\n>>> dropout2d = {name}.nn.Dropout2d(); x = Tensor(2, 3, 2, 2).fill_(1.0); "
            "dropout2d(x)"
        )
        # one line per (sample, channel) map, the lecture's "(0 ,2 ,.,.) =" blocks
        for i, sample in enumerate(r.y.tolist()):
            for j, channel in enumerate(sample):
                rows = "; ".join(" ".join(f"{v:.0f}" for v in row) for row in channel)
                print(f"({i}, {j}, ., .) = [{rows}]")
        print(
            f"check {name}: Dropout2d: every channel all 0 or all {r.scale:g}: "
            f"{'yes' if r.whole_channels else 'NO'} ({r.kept}/{r.y.shape[0] * r.y.shape[1]} "
            f"channels kept) -> "
            f"{'OK' if r.ok else 'FAILED'}"
        )
    return results


def create_model(p: float, width: int, hidden: int = 3) -> torch.nn.Sequential:
    """The lecture's MLP with 3 hidden layers, each followed by ReLU and Dropout(p)."""
    nn = torch.nn
    modules, d = [], 2
    for _ in range(hidden):
        modules += [nn.Linear(d, width), nn.ReLU(), nn.Dropout(p)]
        d = width
    modules.append(nn.Linear(d, 2))
    return nn.Sequential(*modules)


def noisy_disc_set(n: int, noise: float, generator: torch.Generator):
    """The disc problem with round(noise * n) labels flipped: (x, noisy y, flipped mask)."""
    x, y = generate_disc_set(n, generator)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=generator)[: round(noise * n)]] = True
    return x, torch.where(flipped, 1 - y, y), flipped


def flipped_count(args) -> int:
    return round(args.noise * args.n)


def clean_score(args) -> float:
    """The accuracy on the noisy training labels of a model that fits the disc exactly."""
    return 1 - flipped_count(args) / args.n


class Row(NamedTuple):
    p: float
    train: dict[str, float]  # on the noisy labels, per library
    test: dict[str, float]  # on clean held-out labels
    models: dict[str, torch.nn.Module]


def run_experiment(args, device) -> tuple[list[Row], tuple]:
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train, flipped = noisy_disc_set(args.n, args.noise, gen)
    x_test, y_test = generate_disc_set(args.n_test, gen)
    data = x_train, y_train, flipped, x_test, y_test
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    rows = []
    for p in args.ps:
        torch.manual_seed(args.seed)
        reference = create_model(p, args.width).to(device)
        fused = fusedmlp.nn.convert(reference)  # a converted copy: same initial weights
        row = Row(p, {}, {}, {})
        for name, model in (("fusedmlp", fused), ("torch", reference)):
            lib = LIBRARIES[name]
            opt = lib.optim.Adam(model.parameters(), lr=args.lr)
            # the same dropout draws for both (the same masks on fusedmlp's torch fallback)
            torch.manual_seed(args.seed)
            train(
                model,
                lib.nn.CrossEntropyLoss(),
                opt,
                x_train,
                y_train,
                args.epochs,
                args.batch_size,
                args.seed,
                min_batch=1,  # no BatchNorm here: a last batch of one sample is trained on
            )
            row.train[name] = accuracy(model, x_train, y_train)
            row.test[name] = accuracy(model, x_test, y_test)
            row.models[name] = model
        rows.append(row)
    return rows, data


def print_table(rows: list[Row], clean_score: float) -> None:
    print(
        "\naccuracy (the clean disc scores "
        f"{100 * clean_score:.1f}% on the noisy train labels: above it = memorised noise)"
    )
    header = f"{'':>5} | {'fusedmlp':>10} {'torch':>10} | {'fusedmlp':>10} {'torch':>10}"
    print(f"{'p':>5} | {'train, noisy labels':^21} | {'test, clean labels':^21}".rstrip())
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = [100 * d[name] for d in (r.train, r.test) for name in LIBS]
        print(
            f"{r.p:>5g} | {cells[0]:>9.1f}% {cells[1]:>9.1f}% | {cells[2]:>9.1f}% {cells[3]:>9.1f}%"
        )


def plot(path: str, args, rows: list[Row], data) -> None:
    plt = pyplot()

    x_train, y_train, flipped, _, _ = data
    ps = [r.p for r in rows]
    fig, axes = plt.subplots(1, 1 + len(rows), figsize=(4.2 * (1 + len(rows)), 4.0))
    ax = axes[0]
    # torch wide and pale, fusedmlp dashed on top: visible also where the two coincide
    styles = {"torch": {"ls": "-", "lw": 4, "alpha": 0.4}, "fusedmlp": {"ls": "--", "lw": 1.5}}
    for name in LIBS:
        for key, color in (("train", "C2"), ("test", "C3")):
            ax.plot(
                ps,
                [100 * getattr(r, key)[name] for r in rows],
                color=color,
                marker="o",
                label=f"{name}, {'train (noisy labels)' if key == 'train' else 'test (clean)'}",
                **styles[name],
            )
    ax.axhline(100 * clean_score(args), color="gray", lw=0.8, ls=":")
    ax.set_xlabel("dropout p")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{args.n} points, {flipped_count(args)} labels flipped")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)

    xs, ys = torch.meshgrid(torch.linspace(-1, 1, 200), torch.linspace(-1, 1, 200), indexing="xy")
    grid = torch.stack([xs.flatten(), ys.flatten()], 1)
    device = next(rows[0].models["torch"].parameters()).device
    for ax, r in zip(axes[1:], rows):
        regions = {}
        for name, model in r.models.items():
            model.eval()
            with torch.no_grad():
                regions[name] = model(grid.to(device)).argmax(1).cpu().reshape(xs.shape)
        ax.contourf(
            xs, ys, regions["fusedmlp"], levels=[-0.5, 0.5, 1.5], colors=["C0", "C1"], alpha=0.2
        )
        ax.contour(xs, ys, regions["torch"], levels=[0.5], colors="k", linewidths=0.8)
        for label, color in ((0, "C0"), (1, "C1")):
            keep = y_train == label
            ax.scatter(*x_train[keep & ~flipped].T, s=6, color=color)
            ax.scatter(*x_train[keep & flipped].T, s=18, color=color, marker="x")
        radius = math.sqrt(2 / math.pi)
        ax.add_patch(plt.Circle((0, 0), radius, fill=False, ls=":", color="gray"))
        ax.set_aspect("equal")
        ax.set_title(
            f"p = {r.p:g}: test {100 * r.test['fusedmlp']:.1f}% / {100 * r.test['torch']:.1f}%",
            fontsize=9,
        )
    fig.suptitle(
        "filled: fusedmlp's regions, black: torch's boundary, x: flipped labels, dotted: the disc",
        fontsize=9,
    )
    save_figure(fig, path, dpi=110)


def main(argv=None) -> list[Row]:
    """Run the example; returns the table's rows (with the trained models)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--ps",
        type=checked_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
        nargs="+",
        default=[0.0, 0.5, 0.9],
        help="dropout probabilities to train with",
    )
    p.add_argument(
        "--noise",
        type=checked_type(float, lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
        default=0.2,
        help="fraction of the training labels flipped",
    )
    p.add_argument("--n", type=at_least(2), default=200, help="training points")
    p.add_argument("--n-test", type=at_least(1), default=2000, help="clean test points")
    p.add_argument("--width", type=positive_c_int, default=128, help="hidden layers' width")
    p.add_argument("--epochs", type=at_least(1), default=500)
    p.add_argument("--batch-size", type=at_least(1), default=100)
    p.add_argument("--lr", type=FINITE_POSITIVE, default=5e-3, help="Adam's learning rate")
    add_run_options(p, "PNG of accuracy against p and of the decision regions")
    args = p.parse_args(argv)
    device = set_up(p, args)

    print(
        f"the lecture's REPL session on {device} (fusedmlp backend {fusedmlp.get_backend()}): "
        "x = ones(3, 9), requires_grad=True"
    )
    repl = print_repl(device, 0.75, args.seed)
    spatial = print_spatial(device, args.seed)

    print(
        f"\ndisc: {args.n} train points, {flipped_count(args)} labels flipped, "
        f"{args.n_test} clean test points; MLP 2 -> 3 x {args.width} (ReLU, Dropout p) -> 2, "
        f"cross-entropy, Adam lr {args.lr:g}, {args.epochs} epochs of batches of "
        f"{args.batch_size}"
    )
    start = time.perf_counter()
    rows, data = exit_on_out_of_memory(
        p,
        device,
        f"--n {args.n}, --n-test {args.n_test}, --width {args.width}",
        lambda: run_experiment(args, device),
    )
    elapsed = time.perf_counter() - start
    print_table(rows, clean_score(args))
    print(f"({elapsed:.1f} s)")
    if args.plot is not None:
        plot(args.plot, args, rows, data)
    checks = [*repl.values(), *spatial.values()]
    exit_if_failed(p, all(r.ok for r in checks))
    return rows


if __name__ == "__main__":
    main()
