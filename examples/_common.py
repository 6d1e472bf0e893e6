"""What the examples share: their option types, the options they take (--seed, --device,
--threads, --plot), the checks that run before an experiment starts, the out-of-memory
message and the plots' set-up. Not an example itself."""

from __future__ import annotations

import argparse
import math
import os

import torch

import fusedmlp
from fusedmlp.cli._checks import (
    output_path_problem,
    plot_format,
    plot_format_problem,
    positive_c_int,
)
from fusedmlp.cli.train import checked_type

# the two libraries every example runs side by side, by the names it prints
LIBRARIES = {"fusedmlp": fusedmlp, "torch": torch}
LIBS = tuple(LIBRARIES)

FINITE_POSITIVE = checked_type(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
FINITE_NONNEGATIVE = checked_type(
    float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"
)


def at_least(low: int):
    return checked_type(int, lambda v: v >= low, f"an integer >= {low}")


def add_run_options(
    p: argparse.ArgumentParser, plot_help: str | None, *, seed: bool = True, threads: bool = True
) -> None:
    """--seed (with ``seed``), --device, --threads (with ``threads``) and --plot (unless
    ``plot_help`` is None: an example with nothing to draw)."""
    if seed:
        p.add_argument(
            "--seed",  # torch.manual_seed's range
            type=checked_type(
                int, lambda v: -(2**63) <= v < 2**64, "an integer in [-2**63, 2**64)"
            ),
            default=0,
        )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if threads:
        p.add_argument(
            "--threads",
            type=positive_c_int,  # torch.set_num_threads takes a C int
            default=1,
            help="CPU threads (tiny matrices: more only add overhead)",
        )
    if plot_help is not None:
        p.add_argument("--plot", metavar="PATH", help=plot_help)


def set_up(p: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """The device of ``add_run_options``'s --device, after the checks an experiment must pass
    before it starts (the backend, --plot); --threads applied on a CPU."""
    device = _device(p, args.device)
    _check_backend(p, device)
    if getattr(args, "plot", None) is not None:
        _check_plot(p, args.plot)
    if device.type == "cpu" and getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    return device


def exit_on_out_of_memory(p: argparse.ArgumentParser, device, sizes: str, run):
    """``run()``'s result; where it runs out of memory (options beyond this machine's), the
    parser's exit with a one-line message naming ``sizes`` (the options that set the sizes)
    instead of a traceback."""
    try:
        return run()
    except (MemoryError, RuntimeError) as e:
        text = str(e)
        if (
            not isinstance(e, MemoryError)
            and "can't allocate memory" not in text
            and ("out of memory" not in text.lower())
        ):
            raise
        p.exit(
            1,
            f"{p.prog}: out of memory on {device} ({sizes}): "
            f"{text.splitlines()[0] if text else 'MemoryError'}\n",
        )


# torch's module for each of fusedmlp.nn.Linear's activations used here
TORCH_ACTIVATIONS = {
    "sigmoid": torch.nn.Sigmoid,
    "tanh": torch.nn.Tanh,
    "relu": torch.nn.ReLU,
    "leaky_relu": torch.nn.LeakyReLU,
}


def scalar_chain(
    lib: str, activation: str, weights, device, negative_slope: float = 0.01
) -> torch.nn.Sequential:
    """act(w_k ... act(w_1 x)) for scalars: a 1x1 Linear without bias per weight, each followed
    by ``activation``, fused into fusedmlp's Linear, or torch's Linear then torch's module.
    Its first module is the first Linear."""
    layers = []
    for _ in weights:
        if lib == "fusedmlp":
            layers.append(
                fusedmlp.nn.Linear(
                    1, 1, bias=False, activation=activation, negative_slope=negative_slope
                )
            )
        else:
            slope = (negative_slope,) if activation == "leaky_relu" else ()
            layers += [torch.nn.Linear(1, 1, bias=False), TORCH_ACTIVATIONS[activation](*slope)]
    model = torch.nn.Sequential(*layers).to(device)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for m, w in zip(linears, weights):
            m.weight.fill_(w)
    return model


def rel_diff(a: float, b: float) -> float:
    """|a - b| / |b| between two libraries' figures: 0 when equal (also both the same
    infinity), inf where they differ and one is NaN or infinite, or b is 0."""
    if a == b:
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return math.inf
    return abs(a - b) / abs(b)


def exit_if_failed(p: argparse.ArgumentParser, ok: bool) -> None:
    """Exit status 1 when a check the example printed FAILED: scripts see it, not only eyes."""
    if not ok:
        p.exit(1, f"{p.prog}: a check above FAILED\n")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Lay ``fig`` out and write it to ``path`` (checked by ``set_up``), in the format its
    extension names: with no extension a PNG at exactly this path (savefig would append
    ".png")."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format=plot_format(path))
    print(f"plot: {path}")


def _device(p: argparse.ArgumentParser, text: str) -> torch.device:
    """``--device`` as a torch device, or the parser's error: cpu, or cuda where it is present."""
    try:
        device = torch.device(text)
    except RuntimeError:
        p.error(f"argument --device: expected cpu or cuda[:N], got {text!r}")
    if device.type not in ("cpu", "cuda"):
        p.error(f"argument --device: expected cpu or cuda[:N], got {text!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            p.error(f"argument --device: {text} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= count:
            p.error(f"argument --device: {text}, but this machine has {count} CUDA device(s)")
    return device


def _check_backend(p: argparse.ArgumentParser, device: torch.device) -> None:
    """Backend 'triton' on CPU tensors needs Triton's interpreter: say so now, not as the first
    op's traceback (as ``fusedmlp train`` does)."""
    from fusedmlp import backend

    if device.type == "cpu" and fusedmlp.get_backend() == "triton" and backend.triton_available():
        try:
            backend._require_interpreter()
        except RuntimeError as e:
            p.error(str(e))


def _check_plot(p: argparse.ArgumentParser, path: str) -> None:
    """Refuse ``--plot`` before the experiment, not after it (the CLI's checks: matplotlib and
    a format it writes, then a file that can be written)."""
    if not path or os.path.isdir(path) or path.endswith(("/", os.sep)):
        p.error(f"argument --plot: expected a file name such as plot.png, got {path!r}")
    problem = plot_format_problem(path) or output_path_problem(path)
    if problem is not None:
        p.error(f"argument --plot: cannot write {path}: {problem}")
