"""The lecture's batch-normalisation REPL sessions, fusedmlp's and torch's BatchNorm side by side.

First ``x = Tensor(10000, 3).normal_() * [2, 5, 10] + [-10, 25, 3]`` (its mean and std printed),
``bn = nn.BatchNorm1d(3)`` with ``bn.bias = [2, 4, 8]`` and ``bn.weight = [1, 2, 3]``, and
``y = bn(x)``: in training mode BN normalises each component with the batch's mean and variance,
so y.mean(0) is the bias (checked to 1e-4) and y's std the weight (to 1e-5, relative). The std
that the lecture prints (1.0000, 2.0001, 3.0001) is torch's unbiased one, weight *
sqrt(n / (n - 1)); BN divides by the biased variance, whose std is the weight itself: both are
printed.

Then "As for dropout, the model behaves differently during train and test... at inference use
the statistics of the whole dataset": the running_mean and running_var that the one pass above
left (momentum 0.1, from 0 and 1: a tenth of the batch's mean, the unbiased variance mixed into
1), then a BatchNorm1d(3, momentum=None), whose running statistics are the cumulative average
over the mini-batches of one training-mode pass over x: the dataset's mean exactly, and the
mean of the batches' unbiased variances, near the dataset's. In eval mode ``bn(x)`` uses them (checked against weight * (x - running_mean) /
sqrt(running_var + eps) + bias), and a single sample is normalised as it is inside the whole
batch.

Last the BatchNorm2d example: ``x = randn(20, 100, 35, 45)``, ``bn2d = nn.BatchNorm2d(100)``,
``y = bn2d(x)``, the sizes of x, weight and bias, and each channel's mean and std of y over the
batch and both spatial dimensions: 0 and 1.

Each session runs with ``fusedmlp.nn`` and with ``torch.nn`` on the same x, and the outputs and
running statistics of the two are compared (max |diff|; the same within float32's tolerance).

    python examples/batchnorm.py                           # all three sessions (~3 s on CPU)
    python examples/batchnorm.py --shape2d 4 8 5 6 --n 64  # smaller inputs
"""

from __future__ import annotations

import argparse
import math
from typing import NamedTuple

import torch

# run as a script, this file's folder is first on sys.path
from _common import (
    LIBRARIES,
    LIBS,
    add_run_options,
    at_least,
    exit_if_failed,
    exit_on_out_of_memory,
    set_up,
)

import fusedmlp

X_STD, X_MEAN = (2.0, 5.0, 10.0), (-10.0, 25.0, 3.0)
WEIGHT, BIAS = (1.0, 2.0, 3.0), (2.0, 4.0, 8.0)
# BN's output has the bias as its mean and the weight as its (biased) std up to float32
# rounding (a float32 mean of 10000 values near 8: ~1e-5) and eps (1e-5 beside a variance v:
# eps / 2v on the std, 5e-6 at v = 1)
MOMENT_TOLERANCE = 1e-4
# the lecture's x has variances 4 to 100 (eps: 1.3e-6 at most): a relative std tolerance below
# the unbiased std's sqrt(n / (n - 1)) - 1 (5e-5 at n = 10000), which the std checks tell apart
STD_TOLERANCE = 1e-5
# fusedmlp against torch, and a formula against a module: float32's (rtol, atol)
RTOL, ATOL = 1e-4, 1e-5
EPS = 1e-5  # both libraries' default


def lecture_x(n: int, device, seed: int) -> torch.Tensor:
    """``Tensor(n, 3).normal_() * [2, 5, 10] + [-10, 25, 3]``, drawn on the CPU: the same x on
    any device."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.empty(n, 3).normal_(generator=gen)
    return (x * torch.tensor(X_STD) + torch.tensor(X_MEAN)).to(device)


def lecture_bn(lib, device, **kwargs) -> torch.nn.Module:
    """``lib.nn.BatchNorm1d(3)`` with the lecture's bias [2, 4, 8] and weight [1, 2, 3]."""
    bn = lib.nn.BatchNorm1d(3, **kwargs).to(device)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor(BIAS))
        bn.weight.copy_(torch.tensor(WEIGHT))
    return bn


class Check(NamedTuple):
    what: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance  # False for a NaN error

    def line(self, name: str) -> str:
        return (
            f"check {name}: {self.what}: {self.error:.2g} (at most {self.tolerance:.2g}) -> "
            f"{'OK' if self.ok else 'FAILED'}"
        )


def _max_abs(a: torch.Tensor, b) -> float:
    return (
        (a.double() - torch.as_tensor(b, dtype=torch.float64, device=a.device)).abs().max().item()
    )


def _max_rel(a: torch.Tensor, b, scale=None) -> float:
    """max |a - b| / |scale|, ``scale`` b unless given."""
    b = torch.as_tensor(b, dtype=torch.float64, device=a.device)
    scale = b if scale is None else torch.as_tensor(scale, dtype=torch.float64, device=a.device)
    return ((a.double() - b).abs() / scale.abs()).max().item()


def _vec(t) -> str:
    return " ".join(f"{v:9.4f}" for v in torch.as_tensor(t).flatten().tolist())


def _same(label: str, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Print and check fusedmlp's tensors against torch's: max |diff| each, and whether all are
    within float32's tolerance."""
    diffs = {k: _max_abs(a, b) for k, (a, b) in pairs.items()}
    ok = all(
        torch.allclose(a.double(), b.double(), rtol=RTOL, atol=ATOL) for a, b in pairs.values()
    )
    cells = ", ".join(f"{k} {d:.2g}" for k, d in diffs.items())
    print(
        f"fusedmlp vs torch, {label}: max |diff| {cells} -> "
        f"{'same' if ok else 'DIFFERENT'} within float32's tolerance "
        f"(rtol {RTOL:g}, atol {ATOL:g})"
    )
    return ok


class TrainStep(NamedTuple):
    """The lecture's ``y = bn(x)`` in training mode with one library."""

    y: torch.Tensor
    running_mean: torch.Tensor  # after that pass
    running_var: torch.Tensor
    checks: list[Check]


def train_step(lib, x: torch.Tensor) -> TrainStep:
    bn = lecture_bn(lib, x.device)
    y = bn(x).detach()  # the lecture's y, built with autograd on (weight and bias need grad)
    n = len(x)
    checks = [
        Check("y.mean(0) = bias: max |diff|", _max_abs(y.mean(0), BIAS), MOMENT_TOLERANCE),
        Check(
            "y.std(0, correction=0) = weight: max relative diff",
            _max_rel(y.std(0, correction=0), WEIGHT),
            STD_TOLERANCE,
        ),
        Check(
            "y.std(0) = weight * sqrt(n / (n - 1)): max relative diff",
            _max_rel(y.std(0), [w * math.sqrt(n / (n - 1)) for w in WEIGHT]),
            STD_TOLERANCE,
        ),
        # momentum 0.1 from running_mean 0 and running_var 1; torch keeps the unbiased variance
        Check(
            "running_mean = 0.1 x.mean(0): max |diff|",
            _max_abs(bn.running_mean, 0.1 * x.double().mean(0)),
            ATOL + RTOL * x.double().mean(0).abs().max().item(),
        ),
        Check(
            "running_var = 0.9 + 0.1 x.var(0): max relative diff",
            _max_rel(bn.running_var, 0.9 + 0.1 * x.double().var(0)),
            RTOL,
        ),
    ]
    return TrainStep(y, bn.running_mean.clone(), bn.running_var.clone(), checks)


class Inference(NamedTuple):
    """A BatchNorm1d(3, momentum=None) after one training-mode pass over x in mini-batches, then
    eval mode: its running statistics and ``bn(x)``."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    y: torch.Tensor  # bn(x) in eval mode
    rows: int  # rows of x in the pass (whole batches)
    checks: list[Check]


def inference(lib, x: torch.Tensor, batch_size: int) -> Inference:
    bn = lecture_bn(lib, x.device, momentum=None)
    rows = len(x) - len(x) % batch_size
    with torch.no_grad():
        for batch in x[:rows].split(batch_size):
            bn(batch)
        bn.eval()
        y = bn(x)
        alone = bn(x[:1])
    seen = x[:rows].double()
    # the cumulative average of equal batches: their union's mean, and the mean of the
    # batches' unbiased variances (near the union's variance, not equal: it misses the spread
    # of the batch means)
    batch_vars = torch.stack([b.var(0) for b in seen.split(batch_size)]).mean(0)
    # eval mode's y has the bias and weight as its moments only approximately: up to that
    # difference between the running variance and x's own, a sampling effect well inside
    # 4 standard deviations of a variance estimate from ``rows`` Gaussian samples
    spread = 4 * math.sqrt(2 / rows)
    formula = (x.double() - bn.running_mean.double()) / (bn.running_var.double() + bn.eps).sqrt()
    formula = formula * torch.tensor(WEIGHT, dtype=torch.float64, device=x.device)
    formula = formula + torch.tensor(BIAS, dtype=torch.float64, device=x.device)
    checks = [
        Check(
            f"running_mean = x[:{rows}].mean(0): max |diff|",
            _max_abs(bn.running_mean, seen.mean(0)),
            ATOL + RTOL * seen.mean(0).abs().max().item(),
        ),
        Check(
            "running_var = the mean of the batches' var(0): max relative diff",
            _max_rel(bn.running_var, batch_vars),
            RTOL,
        ),
        Check(
            "eval: y = weight (x - running_mean) / sqrt(running_var + eps) + bias: max |diff|",
            _max_abs(y, formula),
            ATOL + RTOL * formula.abs().max().item(),
        ),
        Check(
            "eval: bn(x[:1]) = y[:1]: max |diff|",
            _max_abs(alone, y[:1]),
            ATOL + RTOL * y[:1].abs().max().item(),
        ),
        Check(
            "eval: y.mean(0) ~ bias: max |diff| / weight",
            _max_rel(y.mean(0), BIAS, WEIGHT),
            spread,
        ),
        Check("eval: y.std(0) ~ weight: max relative diff", _max_rel(y.std(0), WEIGHT), spread),
    ]
    return Inference(bn.running_mean.clone(), bn.running_var.clone(), y, rows, checks)


class Conv(NamedTuple):
    """The BatchNorm2d example with one library."""

    y: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    sizes: tuple[torch.Size, torch.Size, torch.Size]  # x, weight, bias
    means: torch.Tensor  # per channel, over N, H, W
    stds: torch.Tensor  # the same, biased
    checks: list[Check]


def batchnorm2d(lib, x: torch.Tensor) -> Conv:
    bn2d = lib.nn.BatchNorm2d(x.size(1)).to(x.device)
    y = bn2d(x).detach()
    dims = (0, 2, 3)
    means, stds = y.mean(dims), y.std(dims, correction=0)
    checks = [
        Check("per-channel y.mean = 0: max |diff|", _max_abs(means, 0.0), MOMENT_TOLERANCE),
        Check(
            "per-channel y.std(correction=0) = 1: max |diff|",
            _max_abs(stds, 1.0),
            MOMENT_TOLERANCE,
        ),
    ]
    sizes = (x.size(), bn2d.weight.size(), bn2d.bias.size())
    return Conv(y, bn2d.running_mean, bn2d.running_var, sizes, means, stds, checks)


def _print_checks(name: str, checks: list[Check]) -> None:
    for check in checks:
        print(check.line(name))


class Results(NamedTuple):
    x: torch.Tensor
    train: dict[str, TrainStep]
    inference: dict[str, Inference]
    x2d: torch.Tensor
    conv: dict[str, Conv]
    same: dict[str, bool]  # session -> fusedmlp's outputs and statistics are torch's


def run(args, device) -> Results:
    same = {}
    x = lecture_x(args.n, device, args.seed)
    n = len(x)
    print(
        f"the lecture's BatchNorm1d session on {device} (fusedmlp backend "
        f"{fusedmlp.get_backend()}): x = Tensor({n}, 3).normal_() * [2, 5, 10] + [-10, 25, 3]"
    )
    print(">>> x.mean(0)")
    print(_vec(x.mean(0)))
    print(">>> x.std(0)")
    print(_vec(x.std(0)))

    train = {}
    for name in LIBS:
        lib = LIBRARIES[name]
        r = train[name] = train_step(lib, x)
        print(
            f"\n>>> bn = {name}.nn.BatchNorm1d(3); bn.bias = [2, 4, 8]; bn.weight = [1, 2, 3]; "
            "y = bn(x)"
        )
        print(">>> y.mean(0)")
        print(_vec(r.y.mean(0)))
        print(">>> y.std(0)               # torch's std: unbiased, divides by n - 1")
        print(_vec(r.y.std(0)))
        print(">>> y.std(0, correction=0)  # BN's normalisation: the biased variance, divides by n")
        print(_vec(r.y.std(0, correction=0)))
        _print_checks(name, r.checks[:3])
    print(
        f"(y.std(0) is weight * sqrt(n / (n - 1)) = weight * {math.sqrt(n / (n - 1)):.6f}: "
        "the lecture's 2.0001 and 3.0001 come from torch's unbiased std, not from BN)"
    )
    same["train"] = _same("y = bn(x)", {"y": (train["fusedmlp"].y, train["torch"].y)})

    print(
        "\ntrain and test: after that one training-mode pass (momentum 0.1, from 0 and 1), "
        "the running statistics"
    )
    for name in LIBS:
        r = train[name]
        print(f">>> bn.running_mean; bn.running_var  # {name}")
        print(_vec(r.running_mean))
        print(_vec(r.running_var))
        _print_checks(name, r.checks[3:])
    same["running"] = _same(
        "after y = bn(x)",
        {
            stat: (getattr(train["fusedmlp"], stat), getattr(train["torch"], stat))
            for stat in ("running_mean", "running_var")
        },
    )

    print(
        f"\nthe statistics of the whole dataset: momentum=None (a cumulative average), one "
        f"training-mode pass over x in batches of {args.batch_size}, then eval mode"
    )
    rows = args.n - args.n % args.batch_size
    if rows < n:
        print(f"(the last {n - rows} rows, short of a batch, left out of the pass)")
    print(f">>> x[:{rows}].mean(0); x[:{rows}].var(0)  # the dataset's statistics")
    print(_vec(x[:rows].mean(0)))
    print(_vec(x[:rows].var(0)))
    infer = {}
    for name in LIBS:
        lib = LIBRARIES[name]
        r = infer[name] = inference(lib, x, args.batch_size)
        print(
            f">>> bn = {name}.nn.BatchNorm1d(3, momentum=None); bias, weight as above; "
            f"for batch in x.split({args.batch_size}): bn(batch)"
        )
        print(">>> bn.running_mean; bn.running_var")
        print(_vec(r.running_mean))
        print(_vec(r.running_var))
        print(">>> bn.eval(); y = bn(x); y.mean(0); y.std(0)")
        print(_vec(r.y.mean(0)))
        print(_vec(r.y.std(0)))
        _print_checks(name, r.checks)
    same["inference"] = _same(
        "momentum=None, then eval",
        {
            stat: (getattr(infer["fusedmlp"], stat), getattr(infer["torch"], stat))
            for stat in ("running_mean", "running_var", "y")
        },
    )

    shape = tuple(args.shape2d)
    gen = torch.Generator().manual_seed(args.seed)
    x2d = torch.randn(shape, generator=gen).to(device)
    print(f"\nthe BatchNorm2d example: x = randn{shape}")
    conv = {}
    for name in LIBS:
        lib = LIBRARIES[name]
        r = conv[name] = batchnorm2d(lib, x2d)
        print(f">>> bn2d = {name}.nn.BatchNorm2d({shape[1]}); y = bn2d(x)")
        for label, size in zip(("x.size()", "bn2d.weight.size()", "bn2d.bias.size()"), r.sizes):
            print(f">>> {label}")
            print(size)
        print(
            f"per-channel mean of y over N, H, W: from {r.means.min().item():.3g} to "
            f"{r.means.max().item():.3g}; std (correction=0): from {r.stds.min().item():.6f} "
            f"to {r.stds.max().item():.6f} (sqrt(var / (var + eps)), eps = {EPS:g})"
        )
        _print_checks(name, r.checks)
    same["conv"] = _same(
        "y = bn2d(x)",
        {
            stat: (getattr(conv["fusedmlp"], stat), getattr(conv["torch"], stat))
            for stat in ("y", "running_mean", "running_var")
        },
    )
    return Results(x, train, infer, x2d, conv, same)


def main(argv=None) -> Results:
    """Run the sessions; returns their results (both libraries') and the comparisons."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # training-mode BatchNorm needs at least 2 samples
    p.add_argument("--n", type=at_least(2), default=10000, help="rows of the BatchNorm1d x")
    p.add_argument(
        "--batch-size",
        type=at_least(2),
        default=100,
        help="mini-batches of the pass that gathers the running statistics",
    )
    p.add_argument(
        "--shape2d",
        type=at_least(1),
        nargs=4,
        metavar=("N", "C", "H", "W"),
        default=[20, 100, 35, 45],
        help="the BatchNorm2d input's size",
    )
    add_run_options(p, None)
    args = p.parse_args(argv)
    if args.batch_size > args.n:
        p.error(f"argument --batch-size: {args.batch_size} is more than --n {args.n}")
    n, _, h, w = args.shape2d
    if n * h * w < 2:
        p.error("argument --shape2d: N * H * W must be at least 2 (values per channel)")
    device = set_up(p, args)
    results = exit_on_out_of_memory(
        p,
        device,
        f"--n {args.n}, --shape2d {' '.join(map(str, args.shape2d))}",
        lambda: run(args, device),
    )
    sessions = (results.train, results.inference, results.conv)
    checks = [c for session in sessions for r in session.values() for c in r.checks]
    exit_if_failed(p, all(results.same.values()) and all(c.ok for c in checks))
    return results


if __name__ == "__main__":
    main()
