"""The lecture's optimizer examples, with fusedmlp's and torch's optimizers side by side.

Gradient descent on small surfaces, as the lecture's figures show it:

- "global": a narrow quadratic valley, f = (x^2 + 30 y^2) / 2, from (-4, 1): vanilla SGD
  (eta = 5e-2) crawls along the valley floor, momentum (gamma = 0.5, then 0.9) accelerates,
  Adam (eta = 1e-1) rescales each coordinate;
- "local": a double well, f = x^4 - 2 x^2 + 0.3 x (+ y^2 / 2), from (2, 1): plain gradient
  descent (eta = 2e-2) settles in the local minimum near x = 0.96, momentum 0.9 carries it
  over the barrier into the global one near x = -1.04 (Adam, too, stays in the local one);
- "diverge": the valley with too large a learning rate (eta = 8e-2 > 2 / 30): the steep
  coordinate oscillates with a growing amplitude.

The lecture's momentum step, u_t = gamma u_{t-1} + eta g_t and theta_{t+1} = theta_t - u_t, is
torch's SGD with ``momentum=gamma`` (its buffer is u_t / eta) for a constant eta. Each run starts
``fusedmlp.optim`` and ``torch.optim`` from the same point and prints both end points, the loss
and the largest distance between the two trajectories. On CUDA (or with the 'triton' backend and
``TRITON_INTERPRET=1`` on a CPU) fusedmlp's fused optimizer kernels take the steps; on a CPU with
the default backend, its torch fallback does.

    python examples/optimizers.py                    # the table (a few seconds on a CPU)
    python examples/optimizers.py --plot opt.png     # and the trajectories (needs matplotlib)
"""

from __future__ import annotations

import argparse

import torch

# run as a script, this file's folder is first on sys.path
from _common import add_run_options, pyplot, save_figure, set_up

import fusedmlp
from fusedmlp.cli.train import checked_type


def valley(t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (t[0] ** 2 + 30.0 * t[1] ** 2)


def double_well(t: torch.Tensor) -> torch.Tensor:
    return t[0] ** 4 - 2.0 * t[0] ** 2 + 0.3 * t[0] + 0.5 * t[1] ** 2


# (example, surface, start, optimizer, its arguments)
RUNS = [
    ("global", valley, (-4.0, 1.0), "SGD", {"lr": 5e-2}),
    ("global", valley, (-4.0, 1.0), "SGD", {"lr": 5e-2, "momentum": 0.5}),
    ("global", valley, (-4.0, 1.0), "SGD", {"lr": 5e-2, "momentum": 0.9}),
    ("global", valley, (-4.0, 1.0), "Adam", {"lr": 1e-1}),
    ("local", double_well, (2.0, 1.0), "SGD", {"lr": 2e-2}),
    ("local", double_well, (2.0, 1.0), "SGD", {"lr": 2e-2, "momentum": 0.9}),
    ("local", double_well, (2.0, 1.0), "Adam", {"lr": 1e-1}),
    ("diverge", valley, (-4.0, 1.0), "SGD", {"lr": 8e-2}),
]


def trajectory(lib, surface, start, name, kwargs, steps, device) -> torch.Tensor:
    """The points [steps + 1, 2] that optimizer ``name`` of ``lib`` visits on ``surface``."""
    theta = torch.nn.Parameter(torch.tensor(start, dtype=torch.float32, device=device))
    opt = getattr(lib.optim, name)([theta], **kwargs)
    points = [theta.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        surface(theta).backward()
        opt.step()
        points.append(theta.detach().clone())
    return torch.stack(points).cpu()


def label(name: str, kwargs: dict) -> str:
    extra = f", gamma {kwargs['momentum']}" if "momentum" in kwargs else ""
    return f"{name} eta {kwargs['lr']:g}{extra}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--steps",
        type=checked_type(int, lambda v: 1 <= v <= 100_000, "an integer in [1, 100000]"),
        default=200,
    )
    add_run_options(p, "PNG of the trajectories on each surface", seed=False, threads=False)
    args = p.parse_args(argv)
    device = set_up(p, args)

    print(
        f"{args.steps} steps on {device} (fusedmlp backend {fusedmlp.get_backend()}); "
        "end point (x, y) and f there, fusedmlp | torch"
    )
    header = (
        f"{'example':8s} {'optimizer':26s} {'fusedmlp':>26s} {'torch':>26s} {'max |diff|':>10s}"
    )
    print(header)
    print("-" * len(header))
    paths = []
    for example, surface, start, name, kwargs in RUNS:
        ours, theirs = (
            trajectory(lib, surface, start, name, kwargs, args.steps, device)
            for lib in (fusedmlp, torch)
        )
        paths.append((example, surface, name, kwargs, ours, theirs))
        # equal points (also the same inf, or NaN in both after a divergence) differ by 0
        same = (ours == theirs) | (ours.isnan() & theirs.isnan())
        diff = (ours - theirs).abs().nan_to_num(nan=float("inf"))
        gap = torch.where(same, torch.zeros_like(diff), diff).max().item()
        ends = [
            f"({t[-1, 0]:8.3g}, {t[-1, 1]:8.3g}) {surface(t[-1]).item():8.3g}"
            for t in (ours, theirs)
        ]
        print(f"{example:8s} {label(name, kwargs):26s} {ends[0]:>26s} {ends[1]:>26s} {gap:10.2g}")

    if args.plot is not None:
        plt = pyplot()

        examples = list(dict.fromkeys(r[0] for r in RUNS))
        fig, axes = plt.subplots(1, len(examples), figsize=(5.0 * len(examples), 4.2))
        for ax, example in zip(axes, examples):
            runs = [r for r in paths if r[0] == example]
            surface = runs[0][1]
            xs, ys = torch.meshgrid(
                torch.linspace(-4.5, 4.5, 200), torch.linspace(-2.0, 2.0, 200), indexing="xy"
            )
            ax.contour(xs, ys, surface(torch.stack([xs, ys])), levels=30, linewidths=0.5)
            for i, (_, _, name, kwargs, ours, theirs) in enumerate(runs):
                color = f"C{i}"
                ax.plot(theirs[:, 0], theirs[:, 1], "-", color=color, label=label(name, kwargs))
                ax.plot(ours[:, 0], ours[:, 1], "--", color=color)
            ax.set_xlim(-4.5, 4.5)
            ax.set_ylim(-2.0, 2.0)
            ax.set_title(f"{example} (torch solid, fusedmlp dashed)")
            ax.legend(fontsize=7)
        save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
