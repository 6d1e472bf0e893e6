"""The lecture's vanishing-gradient examples, with fusedmlp and torch side by side.

1. "A simplified 3-layer MLP, with x, w1, w2, w3 in R": y = sigma(w3 sigma(w2 sigma(w1 x))).
   Its derivative dy/dw1 = sigma'(u5) w3 sigma'(u3) w2 sigma'(u1) x is a product of factors
   sigma' <= 1/4 and |w| <= 1 (weights drawn from a Gaussian of small variance, here std 1/3),
   so it is at most (1/4)^3 |w3 w2 x|. With ReLU instead of sigma the three factors are 1.
   The chain is built twice, from ``fusedmlp.nn.Linear(1, 1, bias=False, activation=...)``
   and from torch's Linear and activation modules; both autograd derivatives are printed beside
   the analytic product. Weights and input are taken positive so that every ReLU is active (the
   lecture's case: a ReLU whose input is negative has derivative 0, the unit is dead).

2. Glorot and Bengio's observation: in a deep MLP with a bounded activation, "gradients for
   layers far from the output vanish to zero". An MLP of ``--depth`` Linear layers (width
   ``--width``, weights N(0, std^2) with std = sqrt(2 / width) unless ``--std`` says otherwise,
   so |w| <= 1 with high probability; biases 0), cross-entropy on a batch of N(0, 1) inputs
   with random labels among 10 classes, one backward pass. The table gives each Linear's
   weight-gradient norm, from the input layer to the output layer, for sigmoid, tanh, ReLU and
   leaky ReLU (alpha = 0.1): sigmoid's decay by orders of magnitude toward the input, ReLU's
   stay of the same size (tanh's too at this std: tanh'(0) = 1, four times sigma'(0)). The
   fusedmlp model is ``fusedmlp.nn.convert`` of the very same torch model (its activations fuse
   into the Linears), with fusedmlp's cross-entropy; the torch model has torch's.

    python examples/vanishing_gradients.py                     # both tables (a few s on CPU)
    python examples/vanishing_gradients.py --plot vanish.png   # and a plot (needs matplotlib)
"""

from __future__ import annotations

import argparse
import math

import torch

# run as a script, this file's folder is first on sys.path
from _common import (
    FINITE_POSITIVE,
    LIBS,
    add_run_options,
    at_least,
    exit_on_out_of_memory,
    pyplot,
    save_figure,
    scalar_chain,
    set_up,
)

import fusedmlp

ACTIVATIONS = {  # name: (torch module, fusedmlp.nn.Linear's activation and negative_slope)
    "sigmoid": (torch.nn.Sigmoid, ("sigmoid", 0.01)),
    "tanh": (torch.nn.Tanh, ("tanh", 0.01)),
    "relu": (torch.nn.ReLU, ("relu", 0.01)),
    "leaky_relu": (lambda: torch.nn.LeakyReLU(0.1), ("leaky_relu", 0.1)),
}
CHAIN_ACTIVATIONS = ("sigmoid", "relu")
CHAIN_STD = 1.0 / 3.0  # |w| <= 1 with probability 99.7%
CLASSES = 10


def chain_derivative(lib: str, act: str, x: float, weights, device) -> float:
    """dy/dw1 of y = act(w3 act(w2 act(w1 x))) by autograd through ``lib``'s modules."""
    name, slope = ACTIVATIONS[act][1]
    model = scalar_chain(lib, name, weights, device, slope)
    model(torch.full((1, 1), x, device=device)).sum().backward()
    return model[0].weight.grad.item()


def chain_analytic(act: str, x: float, weights) -> tuple[list[float], float]:
    """The lecture's factors act'(u1), act'(u3), act'(u5) and the product
    act'(u5) w3 act'(u3) w2 act'(u1) x, in float64."""
    factors, h = [], x
    for w in weights:
        u = w * h
        if act == "sigmoid":
            h = 1.0 / (1.0 + math.exp(-u))
            factors.append(h * (1.0 - h))
        else:  # the lecture's ReLU derivative: 0 for u <= 0
            h = max(u, 0.0)
            factors.append(1.0 if u > 0 else 0.0)
    _, w2, w3 = weights
    return factors, factors[2] * w3 * factors[1] * w2 * factors[0] * x


def create_model(act: str, width: int, depth: int) -> torch.nn.Sequential:
    """``depth`` Linear layers (width -> width, ..., width -> CLASSES), ``act`` between them."""
    modules = []
    for i in range(depth):
        last = i == depth - 1
        modules.append(torch.nn.Linear(width, CLASSES if last else width))
        if not last:
            modules.append(ACTIVATIONS[act][0]())
    return torch.nn.Sequential(*modules)


def gaussian_init_(model: torch.nn.Module, std: float, seed: int) -> None:
    """Weights ~ N(0, std^2) from ``seed`` (the same weights for every activation), biases 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                m.bias.zero_()


def weight_gradient_norms(model, loss_fn, x, y) -> list[float]:
    """One backward pass; each Linear's ||dL/dW||, input layer first."""
    loss_fn(model(x), y).backward()
    # state_dict names survive convert(): the same parameters, in the same order, in both
    return [p.grad.double().norm().item() for n, p in model.named_parameters() if "weight" in n]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=at_least(2), default=10, help="Linear layers in the MLP")
    p.add_argument("--width", type=at_least(1), default=64)
    p.add_argument("--batch", type=at_least(1), default=256)
    p.add_argument(
        "--std",
        type=FINITE_POSITIVE,
        default=None,
        help="the MLP's weight std (default sqrt(2 / width))",
    )
    add_run_options(p, "PNG of the gradient norms per layer")
    args = p.parse_args(argv)
    device = set_up(p, args)
    exit_on_out_of_memory(
        p,
        device,
        f"--batch {args.batch}, --width {args.width}, --depth {args.depth}",
        lambda: (_chain(args, device), _deep(args, device)),
    )


def _chain(args, device) -> None:
    gen = torch.Generator().manual_seed(args.seed)
    # positive, so that every ReLU is active; float32 values, as the layers hold them
    draws = torch.randn(4, generator=gen).abs()
    x = draws[0].item()
    weights = (draws[1:] * CHAIN_STD).tolist()
    print(
        f"scalar chain y = act(w3 act(w2 act(w1 x))): x = {x:.4f}, "
        + ", ".join(f"w{i + 1} = {w:.4f}" for i, w in enumerate(weights))
        + f" (|N(0, {CHAIN_STD:.3g}^2)|); on {device} (fusedmlp backend {fusedmlp.get_backend()})"
    )
    print("dy/dw1 = act'(u5) w3 act'(u3) w2 act'(u1) x: the analytic product and autograd's")
    header = (
        f"{'act':8s}"
        + "".join(" " + f"act'(u{i})".rjust(8) for i in (1, 3, 5))
        + "".join(f" {name:>12s}" for name in ("analytic", "fusedmlp", "torch", "bound"))
    )
    print(header)
    print("-" * len(header))
    _, w2, w3 = weights
    for act in CHAIN_ACTIVATIONS:
        factors, product = chain_analytic(act, x, weights)
        ours, theirs = (chain_derivative(lib, act, x, weights, device) for lib in LIBS)
        # the lecture's bound: each sigma' <= 1/4; ReLU's factors are exactly 1
        bound = (0.25**3 if act == "sigmoid" else 1.0) * abs(w3 * w2 * x)
        print(
            f"{act:8s} "
            + " ".join(f"{f:>8.4f}" for f in factors)
            + f" {product:>12.5e} {ours:>12.5e} {theirs:>12.5e} {bound:>12.5e}"
        )
    print("bound: (1/4)^3 |w3 w2 x| for sigmoid (<= |x| / 64 when |w| <= 1), |w3 w2 x| for relu")


def _row(label: str, cells) -> str:
    """A table row: the label, then one pair of cells (fusedmlp, torch) per activation."""
    pairs = zip(*[iter(cells)] * 2)
    return f"{label:>5s}" + "".join(f"  {ours:>10s} {theirs:>10s}" for ours, theirs in pairs)


def _deep(args, device) -> None:
    std = math.sqrt(2.0 / args.width) if args.std is None else args.std
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, args.width, generator=gen).to(device)
    y = torch.randint(CLASSES, (args.batch,), generator=gen).to(device)
    print(
        f"\nMLP of {args.depth} Linear layers, width {args.width}, {CLASSES} outputs; weights "
        f"N(0, {std:.4g}^2), biases 0; cross-entropy on {args.batch} N(0, 1) inputs with random "
        f"labels; one backward pass on {device} (fusedmlp backend {fusedmlp.get_backend()})"
    )
    norms, fused_counts = {}, []
    for act in ACTIVATIONS:
        reference = create_model(act, args.width, args.depth)
        gaussian_init_(reference, std, args.seed)
        reference.to(device)
        fused = fusedmlp.nn.convert(reference)  # a converted copy: same weights
        # where convert() could not fuse, fusedmlp would run torch's own activation modules
        count = sum(
            isinstance(m, fusedmlp.nn.Linear) and m.activation is not None for m in fused.modules()
        )
        fused_counts.append(f"{act} {count}/{args.depth - 1}")
        norms[(act, "fusedmlp")] = weight_gradient_norms(
            fused, fusedmlp.nn.CrossEntropyLoss(), x, y
        )
        norms[(act, "torch")] = weight_gradient_norms(reference, torch.nn.CrossEntropyLoss(), x, y)
    print("activations fused into fusedmlp's Linears by convert(): " + ", ".join(fused_counts))

    columns = [(act, lib) for act in ACTIVATIONS for lib in LIBS]
    print("\n||dL/dW|| of each Linear layer, from the input layer (1) to the output layer")
    print((f"{'':5s}" + "".join(f"  {act:^21s}" for act in ACTIVATIONS)).rstrip())
    header = _row("layer", [lib for _, lib in columns])
    print(header)
    print("-" * len(header))
    for i in range(args.depth):
        print(_row(str(i + 1), [f"{norms[col][i]:.4e}" for col in columns]))
    print("-" * len(header))
    # as tensors: a dead last layer (every ReLU off, at a tiny width) divides by 0 into inf or nan
    ratios = [torch.tensor(norms[col][0]) / norms[col][-1] for col in columns]
    print(_row("1/L", [f"{r.item():.4e}" for r in ratios]))
    print(
        "1/L: the first layer's norm over the last one's. Backpropagation through a sigmoid\n"
        "layer multiplies the gradient by sigma' <= 1/4: it vanishes toward the input."
    )

    if args.plot is not None:
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        layers = list(range(1, args.depth + 1))
        for i, act in enumerate(ACTIVATIONS):
            # torch's first: fusedmlp's dashed line on top of it stays visible
            ax.plot(layers, norms[(act, "torch")], "-", color=f"C{i}", marker="o", label=act)
            ax.plot(layers, norms[(act, "fusedmlp")], "--", color="k", marker="x", ms=4, lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("Linear layer (1 = input layer)")
        ax.set_ylabel("||dL/dW||")
        ax.set_title(
            f"depth {args.depth}, width {args.width}, std {std:.3g} (torch solid, fusedmlp dashed)",
            fontsize=10,
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
