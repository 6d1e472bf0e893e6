"""``fusedmlp train``: the main job.

Trains a :class:`fusedmlp.nn.MLP` (BatchNorm, dropout, fused Adam by default) on scikit-learn's
bundled handwritten digits, and the identical torch model beside it (same initial weights via a
``state_dict`` copy, same batches from one ``torch.Generator``, same dropout seeds), then prints
both side by side: train loss, test accuracy, time per step and the speed ratio.

scikit-learn, matplotlib and tqdm are imported inside :func:`run`, so ``--help`` works without
them.
"""

from __future__ import annotations

import argparse
import math

from ._checks import (
    MATPLOTLIB_HINT,
    checked_type,
    output_path_problem,
    plot_format,
    plot_format_problem,
    positive_c_int,
)

DEFAULT_HIDDEN = [256, 128]
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.05}
DEFAULT_MOMENTUM = 0.9


_positive_int = checked_type(int, lambda v: v > 0, "a positive integer")
_probability = checked_type(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
_positive_float = checked_type(float, lambda v: math.isfinite(v) and v > 0.0, "a finite number > 0")
_non_negative_float = checked_type(float, lambda v: math.isfinite(v) and v >= 0.0, "a number >= 0")
# numpy's generators refuse negative seeds
_seed = checked_type(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data (nothing is ever downloaded)")
    data.add_argument(
        "--dataset",
        choices=["digits", "disc", "mnist"],
        default=None,
        help="digits: scikit-learn's bundled 8x8 digits (default); disc: the lecture's 2-D "
        "points-in-a-disc problem; mnist: IDX files from --data-dir",
    )
    data.add_argument(
        "--data", metavar="PATH.npz", help="your own data: a .npz with arrays X and y"
    )
    data.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder with MNIST-format IDX files (train-images-idx3-ubyte, ... optionally .gz)",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--hidden",
        type=positive_c_int,
        nargs="+",
        default=DEFAULT_HIDDEN,
        metavar="N",
        help="hidden layer widths, e.g. --hidden 128 64 (default: 256 128)",
    )
    model.add_argument(
        "--batchnorm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="BatchNorm1d after each hidden Linear (default: on)",
    )
    model.add_argument(
        "--dropout", type=_probability, default=0.1, help="dropout probability (default: 0.1)"
    )
    model.add_argument(
        "--activation",
        choices=["relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu"],
        default="relu",
        help="hidden activation (default: relu)",
    )
    opt = parser.add_argument_group("training")
    opt.add_argument(
        "--optimizer",
        choices=["adam", "sgd"],
        default="adam",
        help="fused optimizer (default: adam)",
    )
    opt.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help=f"learning rate (default: {DEFAULT_LR['adam']} for adam, {DEFAULT_LR['sgd']} for sgd)",
    )
    opt.add_argument(
        "--momentum",
        type=_non_negative_float,
        default=None,
        help=f"SGD momentum (default: {DEFAULT_MOMENTUM}; --optimizer sgd only)",
    )
    opt.add_argument("--epochs", type=_positive_int, default=20, help="(default: 20)")
    opt.add_argument("--batch-size", type=_positive_int, default=64, help="(default: 64)")
    opt.add_argument(
        "--device", default=None, help="torch device (default: cuda when present, else cpu)"
    )
    opt.add_argument(
        "--seed", type=_seed, default=0, help="weights, split, batch order, dropout (default: 0)"
    )
    opt.add_argument(
        "--threads",
        type=positive_c_int,
        default=None,
        help="torch's CPU threads (default on cpu: 1; a small MLP's matrices are too small for "
        "threads to pay off, and they stall badly on a busy machine)",
    )
    opt.add_argument(
        "--cuda-graph",
        action="store_true",
        help="CUDA only: capture each model's training step (forward, loss, backward, "
        "optimizer step) in a CUDA graph after 3 eager warm-up steps, then replay it for every "
        "batch, so the host's launch time leaves the step. Both models alike (Adam with "
        "capturable=True); each epoch's last partial batch is left out (a graph has one shape)",
    )
    opt.add_argument(
        "--backend",
        choices=["auto", "triton", "torch"],
        default=None,
        help="fusedmlp backend (default: $FUSEDMLP_BACKEND or auto: Triton on CUDA tensors)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--no-compare",
        dest="compare",
        action="store_false",
        help="train only the fusedmlp model (no torch twin)",
    )
    out.add_argument("--plot", metavar="PATH", help="write a PNG of both loss curves")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fail(message: str):
    raise SystemExit(f"fusedmlp train: error: {message}")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_bar(total: int, disable: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar without it
        tqdm = None
    if tqdm is None or disable:

        class _NoBar:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

            @staticmethod
            def write(s):
                print(s, flush=True)

        return _NoBar()
    bar = tqdm(total=total, unit="step", leave=False, dynamic_ncols=True)
    bar.write = tqdm.write
    return bar


def _accuracy(net, x, y, chunk: int = 8192) -> float:
    import torch

    was_training = net.training
    net.eval()
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            correct += (net(x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum()
    net.train(was_training)
    return correct.item() / len(x)


def _check_plot_path(path: str) -> None:
    """Refuse ``--plot`` before training, not after it: matplotlib importable, a format it
    writes, a file that can be written."""
    if not path:
        _fail("--plot needs a file name, e.g. --plot loss.png")
    problem = plot_format_problem(path)
    if problem is not None and "matplotlib" in problem:
        _fail(f"--plot needs matplotlib: {MATPLOTLIB_HINT}")
    problem = problem or output_path_problem(path)
    if problem is not None:
        if "folder;" in problem:
            problem += ", e.g. loss.png"
        _fail(f"cannot write the plot {path}: {problem}")


def _plot(path: str, curves: dict, steps_per_epoch: int, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        _fail(f"--plot needs matplotlib: {MATPLOTLIB_HINT}")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {
        "fusedmlp": {"linewidth": 2.2, "alpha": 0.55},
        "torch": {"linewidth": 0.9, "linestyle": "--"},
    }
    for name, losses in curves.items():
        epochs = [(i + 1) / steps_per_epoch for i in range(len(losses))]
        ax.plot(epochs, losses, label=name, **styles.get(name, {}))
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss (cross-entropy)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120, format=plot_format(path))
    except OSError as e:
        _fail(f"cannot write the plot {path}: {e}")
    finally:
        plt.close(fig)


def _train_step(net, loss_fn, opt, x, y):
    """One training step on the batch ``(x, y)`` after the gradients were reset: forward,
    loss, backward, optimizer step; returns the loss."""
    loss = loss_fn(net(x), y)
    loss.backward()
    opt.step()
    return loss


class _GraphedStep:
    """One run's training step as a CUDA graph (``--cuda-graph``), the pattern of torch's CUDA
    graphs notes ("whole network capture"): the batch goes into static input tensors; the first
    ``WARMUP`` calls are eager steps on a side stream (the lazy state, compiled kernels and
    autotuning all made before the capture); the next call captures one step (nothing runs
    while capturing) and replays it, as does every call after it. Gradients stay in the graph's
    memory: no ``zero_grad`` between replays (the backward of the captured step writes them,
    it does not accumulate). Returns the step's loss (a copy: the next replay overwrites it)."""

    WARMUP = 3

    def __init__(self, net, loss_fn, opt, x, y, batch_size: int):
        import torch

        self.net, self.loss_fn, self.opt = net, loss_fn, opt
        self.src_x, self.src_y = x, y
        self.x = torch.empty((batch_size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        self.y = torch.empty((batch_size,), dtype=y.dtype, device=y.device)
        self.stream = torch.cuda.Stream(x.device)
        self.warm, self.graph, self.loss = 0, None, None

    def _step(self):
        return _train_step(self.net, self.loss_fn, self.opt, self.x, self.y)

    def __call__(self, idx):
        import torch

        torch.index_select(self.src_x, 0, idx, out=self.x)
        torch.index_select(self.src_y, 0, idx, out=self.y)
        if self.graph is None:
            current = torch.cuda.current_stream(self.x.device)
            if self.warm < self.WARMUP:
                self.warm += 1
                self.stream.wait_stream(current)
                with torch.cuda.stream(self.stream):
                    self.opt.zero_grad(set_to_none=True)
                    loss = self._step().detach()
                current.wait_stream(self.stream)
                return loss
            self.opt.zero_grad(set_to_none=True)  # the captured backward makes the gradients
            self.graph, self.loss = _capture(self._step)
        self.graph.replay()
        return self.loss.detach().clone()


def _capture(fn):
    """``(graph, fn's result)``: ``fn`` captured in a new CUDA graph (nothing runs yet)."""
    import torch

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import backend as _backend
    from .data import DataError, load

    # --- set-up ------------------------------------------------------------------------------
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            _fail(f"bad --device {args.device!r}: {e}")
        if device.type not in ("cpu", "cuda"):
            _fail(f"unsupported --device {args.device!r} (cpu or cuda)")
        if device.type == "cuda" and not torch.cuda.is_available():
            _fail(f"--device {args.device} asked for, but CUDA is not available here")
        if device.type == "cuda" and device.index is not None:
            count = torch.cuda.device_count()
            if device.index >= count:
                _fail(f"--device {args.device}: this machine has {count} CUDA device(s), "
                      f"cuda:0 .. cuda:{count - 1}")  # fmt: skip
    if args.momentum is not None and args.optimizer != "sgd":  # else silently not used
        _fail(f"--momentum is for --optimizer sgd; {args.optimizer} has no momentum argument")
    if args.cuda_graph and device.type != "cuda":
        _fail(f"--cuda-graph needs a CUDA device; this run's device is {device}")
    backend_name = args.backend or _backend.get_backend()
    if backend_name == "triton" and device.type == "cpu" and _backend.triton_available():
        try:  # else the first op raises it, after the data is loaded and the models built
            _backend._require_interpreter()
        except RuntimeError as e:
            _fail(str(e))
    if args.plot is not None:
        _check_plot_path(args.plot)
    try:
        ds = load(args.dataset, data=args.data, data_dir=args.data_dir, seed=args.seed)
    except DataError as e:
        _fail(str(e))
    previous_backend = _backend.get_backend()
    previous_threads = torch.get_num_threads()
    try:
        _backend.set_backend(backend_name)
    except (ValueError, RuntimeError) as e:
        _fail(str(e))
    try:
        if args.threads is not None or device.type == "cpu":
            torch.set_num_threads(args.threads or 1)
        return _train(args, ds, device, backend_name)
    except (MemoryError, RuntimeError) as e:
        # torch.OutOfMemoryError (CUDA) is a RuntimeError; the CPU allocator raises a plain one
        text = str(e)
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and not (
            "can't allocate memory" in text
            or "out of memory" in text.lower()
            or "size calculation overflowed" in text
        ):
            raise
        _fail(
            f"out of memory on {device} (--hidden {' '.join(map(str, args.hidden))}, "
            f"--batch-size {args.batch_size}): {text.splitlines()[0] if text else type(e).__name__}"
        )
    finally:
        _backend.set_backend(previous_backend)
        torch.set_num_threads(previous_threads)


def _train(args, ds, device, backend_name: str) -> int:
    import time

    import torch

    from .. import nn as fnn
    from .. import optim as foptim

    x_train = torch.from_numpy(ds.x_train).to(device)
    y_train = torch.from_numpy(ds.y_train).to(device)
    x_test = torch.from_numpy(ds.x_test).to(device)
    y_test = torch.from_numpy(ds.y_test).to(device)
    n = len(x_train)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]

    torch.manual_seed(args.seed)
    model = fnn.MLP(
        ds.num_features,
        args.hidden,
        ds.num_classes,
        activation=args.activation,
        batchnorm=args.batchnorm,
        dropout=args.dropout,
    ).to(device)
    runs = {"fusedmlp": {"net": model, "loss_fn": fnn.CrossEntropyLoss()}}
    if args.compare:
        runs["torch"] = {"net": model.to_torch(), "loss_fn": torch.nn.CrossEntropyLoss()}
    for name, r in runs.items():
        fused = name == "fusedmlp"
        params = r["net"].parameters()
        if args.optimizer == "adam":
            # capturable: the step counters on the device, read there by the captured step
            extra = {"capturable": True} if args.cuda_graph else {}
            r["opt"] = (foptim.Adam if fused else torch.optim.Adam)(params, lr=lr, **extra)
        else:
            momentum = DEFAULT_MOMENTUM if args.momentum is None else args.momentum
            r["opt"] = (foptim.SGD if fused else torch.optim.SGD)(params, lr=lr, momentum=momentum)
        r.update(losses=[], epoch_loss=[], acc=[], step_time=[])

    batch_size = min(args.batch_size, n)
    # a last batch of 1 sample breaks BatchNorm's training mode: dropped, with BatchNorm only
    steps = n // batch_size + (1 if n % batch_size > (1 if args.batchnorm else 0) else 0)
    if args.cuda_graph:  # one captured shape: full batches only
        steps = n // batch_size
        for r in runs.values():
            r["graphed"] = _GraphedStep(r["net"], r["loss_fn"], r["opt"], x_train, y_train,
                                        batch_size)  # fmt: skip
    if args.batchnorm and batch_size < 2:  # the step count above drops only a last batch of 1
        _fail(
            f"BatchNorm needs batches of at least 2 samples, got {batch_size} ({n} train "
            f"samples, --batch-size {args.batch_size}): more of either, or --no-batchnorm"
        )
    n_params = sum(p.numel() for p in model.parameters())
    where = (
        "Triton kernels"
        if backend_name == "triton" or (backend_name == "auto" and device.type == "cuda")
        else "torch fallback"
    )
    print(f"data     {ds.describe()}")
    print(
        f"model    MLP {ds.num_features} -> {' -> '.join(map(str, args.hidden))} -> "
        f"{ds.num_classes}, {args.activation}, batchnorm={'on' if args.batchnorm else 'off'}, "
        f"dropout={args.dropout}, {n_params:,} parameters"
    )
    graphed = (
        ", each step a CUDA graph replay (the last partial batch of an epoch left out)"
        if args.cuda_graph
        else ""
    )
    print(
        f"training {args.optimizer} lr={lr:g}, {args.epochs} epochs x {steps} steps of "
        f"{batch_size}, seed {args.seed}{graphed}"
    )
    threads = f", {torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else ""
    print(f"device   {device} (fusedmlp backend {backend_name}: {where}{threads})", flush=True)

    order_gen = torch.Generator().manual_seed(args.seed)
    bar = _make_bar(args.epochs * steps * len(runs), args.no_progress)
    try:
        for epoch in range(args.epochs):
            perm = torch.randperm(n, generator=order_gen).to(device)
            batches = [perm[i * batch_size : (i + 1) * batch_size] for i in range(steps)]
            for r in runs.values():
                net, loss_fn, opt = r["net"], r["loss_fn"], r["opt"]
                net.train()
                torch.manual_seed(args.seed * 100_003 + epoch)  # same dropout draws for both
                losses = []
                _sync(device)
                t0 = time.perf_counter()
                for idx in batches:
                    if args.cuda_graph:
                        loss = r["graphed"](idx)
                    else:
                        opt.zero_grad(set_to_none=True)
                        loss = _train_step(net, loss_fn, opt, x_train[idx], y_train[idx])
                    losses.append(loss.detach())
                    bar.update()
                _sync(device)
                r["step_time"].append((time.perf_counter() - t0) / steps)
                losses = torch.stack(losses).float().cpu()
                r["losses"].extend(losses.tolist())
                r["epoch_loss"].append(losses.mean().item())
                r["acc"].append(_accuracy(net, x_test, y_test))
            line = f"epoch {epoch + 1:>3}/{args.epochs}"
            for name, r in runs.items():
                line += (
                    f"  {name}: loss {r['epoch_loss'][-1]:.4f} acc {100 * r['acc'][-1]:6.2f}% "
                    f"{1e3 * r['step_time'][-1]:7.3f} ms/step"
                )
            bar.write(line)
            fm = runs["fusedmlp"]
            bar.set_postfix_str(f"loss {fm['epoch_loss'][-1]:.4f} acc {100 * fm['acc'][-1]:.2f}%")
    finally:
        bar.close()

    # --- summary -----------------------------------------------------------------------------
    def per_step(r):
        times = r["step_time"][1:] or r["step_time"]  # the first epoch is warm-up
        return sorted(times)[len(times) // 2]

    names = list(runs)
    print()
    print(f"{'':<22}" + "".join(f"{name:>14}" for name in names))
    print(
        f"{'train loss (last ep.)':<22}"
        + "".join(f"{runs[k]['epoch_loss'][-1]:>14.4f}" for k in names)
    )
    print(f"{'test accuracy':<22}" + "".join(f"{100 * runs[k]['acc'][-1]:>13.2f}%" for k in names))
    print(f"{'time per step':<22}" + "".join(f"{1e3 * per_step(runs[k]):>11.3f} ms" for k in names))
    diverged = [k for k in names if not math.isfinite(runs[k]["epoch_loss"][-1])]
    if diverged:
        print(
            f"note: the training loss of {' and '.join(diverged)} is not finite: training "
            f"diverged (lr {lr:g}; try a smaller --lr)",
            flush=True,
        )
    if args.compare:
        ratio = per_step(runs["torch"]) / per_step(runs["fusedmlp"])
        note = "median over epochs" + (", first excluded" if args.epochs > 1 else "")
        print(f"speed ratio: fusedmlp {ratio:.2f}x torch (torch time / fusedmlp time; {note})")
    if args.plot is not None:
        _plot(
            args.plot,
            {k: r["losses"] for k, r in runs.items()},
            steps,
            f"{ds.name}: MLP {'-'.join(map(str, args.hidden))}, {args.optimizer}, {device}",
        )
        print(f"plot     {args.plot}")
    return 0
