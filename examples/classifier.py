"""The lecture's "Neural Network for classification", with fusedmlp and torch side by side.

1. The pieces, checked against the lecture's formulas (float64) on the device, through fusedmlp's
   modules and through torch's:

   - the element-wise activations' derivatives, sigm' = sigm (1 - sigm), tanh' = 1 - tanh^2 and
     relu' = 1_{x>0} (0 at x = 0), by autograd through a 1x1 ``fusedmlp.nn.Linear(1, 1,
     bias=False, activation=...)`` of weight 1 (the activation fused into the Linear) on a grid
     of points, and through ``torch.nn.Linear`` followed by torch's activation module;
   - the softmax Jacobian, s_i (1 - s_i) on the diagonal and -s_i s_j off it, by
     ``torch.autograd.functional.jacobian`` of ``fusedmlp.nn.Softmax`` and of torch's;
   - the negative log-likelihood -log f(x)_y, as the lecture writes it (the log of the Softmax
     output) and as ``CrossEntropyLoss`` on the logits, with its gradient softmax(z) - onehot(y)
     (the Jacobian's chain rule: -(1/s_y) ds_y/dz_j = s_j - 1_{j=y});
   - the L2 term: an SGD step on L + lambda (||W^h||^2 + ||W^o||^2) is an SGD step on L with
     ``weight_decay = 2 lambda`` on the two weight matrices (the gradient of lambda ||W||^2 is
     2 lambda W). Not ``weight_decay = lambda``, and not on every parameter: an optimizer's
     weight_decay also decays the biases, which the lecture's Omega leaves out.

   The log of the Softmax output is the unstable form. Softmax's probabilities underflow to 0 in
   float32 once a logit lies more than about 104 below the largest; log(0) = -inf, so the loss is
   inf and its gradient NaN. The lecture's literal form does that with either library: both
   Softmaxes subtract the row's max, but the probability itself lies below float32's range, and
   neither library rewrites log(Softmax(z)) into log_softmax(z).
   ``CrossEntropyLoss`` on the logits (torch: log_softmax then NLL; fusedmlp: one fused kernel)
   works in the log domain, log f(x)_y = z_y - max z - log sum_j exp(z_j - max z), finite for any
   finite logits, and its gradient softmax(z) - onehot(y) needs no division by a probability. The
   line after the checks shows both forms on logits 100 times larger.

2. The lecture's "One Hidden Layer Network", ``Sequential(Linear(D_in, H), Tanh(), Linear(H,
   D_out), Softmax(dim=1))`` (the lecture's ``Softmax()`` leaves dim to torch's deprecated
   implicit rule, which picks 1 on a batch), trained by minibatch SGD on the cost
   L_S = -(1/|S|) sum_s log f(x^s)_{y^s} + lambda (||W^h||^2 + ||W^o||^2), the penalty added to
   the loss as the lecture writes it (``--l2 LAMBDA``; ``--weight-decay`` is the optimizer's form,
   on the weight matrices only: ``--l2 0 --weight-decay 2e-4`` prints the default run's table).
   The model is trained on its logits, ``model[:-1]``, with
   ``CrossEntropyLoss`` (``--loss log-softmax``: LogSoftmax then NLLLoss; ``--loss softmax-log``:
   the lecture's literal log of the Softmax output, which trains the same here, the logits
   staying small); the whole model, Softmax included, gives the probabilities p(Y = c | x) whose
   argmax is the prediction. The data: scikit-learn's bundled 8x8 handwritten digits (1,797
   images, 64 pixels scaled to [0, 1], 10 classes; 20% held out), as ``fusedmlp train`` uses:
   shipped with scikit-learn, so nothing is downloaded, a real 10-class problem (not a 2-D toy,
   whose two or three classes a softmax hardly needs) and small enough to train in seconds on a
   CPU.

The torch model is the lecture's ``nn.Sequential``; the fusedmlp model is ``fusedmlp.nn.convert``
of the very same initial model (the Tanh fuses into the first Linear, the Softmax becomes
fusedmlp's), trained with ``fusedmlp.optim.SGD`` and ``fusedmlp.nn.CrossEntropyLoss`` against
torch's; both see the same batches. The default run (seed 0, CPU): 89% test accuracy after one
epoch, 97.5% after 5, 96.9% after 20 with 99.5% on the training set, whose NLL keeps falling (to
0.034) while the test NLL hovers between 0.087 and 0.12 from epoch 10 on: the overfitting that
the lecture's stopping criterion (stop when the NLL on a validation set stops decreasing) is
for. On a CPU with the default backend fusedmlp runs its torch fallback and gives torch's
numbers exactly; on CUDA (or with the 'triton' backend and ``TRITON_INTERPRET=1`` on a CPU) its
kernels run and agree to float32 rounding.

    python examples/classifier.py                        # checks and table (~8 s on a CPU)
    python examples/classifier.py --loss softmax-log     # log(Softmax(z)): the same table here
    python examples/classifier.py --plot classifier.png  # and the curves (needs matplotlib)
"""

from __future__ import annotations

import argparse
import time
from typing import NamedTuple

import torch

# run as a script, this file's folder is first on sys.path
from _common import (
    FINITE_NONNEGATIVE,
    FINITE_POSITIVE,
    LIBRARIES,
    LIBS,
    add_run_options,
    at_least,
    exit_if_failed,
    exit_on_out_of_memory,
    pyplot,
    rel_diff,
    save_figure,
    scalar_chain,
    set_up,
)

import fusedmlp
from fusedmlp.cli.data import DataError, load_digits

# the lecture's name: (fusedmlp.nn.Linear's activation, torch's module, the lecture's derivative)
ACTIVATIONS = {
    "sigm": ("sigmoid", lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x))),
    "tanh": ("tanh", lambda x: 1 - torch.tanh(x) ** 2),
    "relu": ("relu", lambda x: (x > 0).to(x.dtype)),
}
FORMULAS = {
    "sigm": "sigm'(x) = sigm(x)(1 - sigm(x))",
    "tanh": "tanh'(x) = 1 - tanh(x)^2",
    "relu": "relu'(x) = 1_{x>0}",
}
GRID = torch.arange(-40, 41, dtype=torch.float32) / 10  # [-4, 4] in steps of 0.1, with 0 exactly
CLASSES = 10
CHECK_LAMBDA = 0.01  # the weight-decay check's own lambda: --l2 may be 0
LOSSES = ("cross-entropy", "log-softmax", "softmax-log")
# Float32 values of size about 1 (derivatives, probabilities, NLLs of a few units): a few ulps
# (1.2e-7) of rounding; relu' and its 0/1 values are exact.
TOLERANCES = {"sigm": 1e-6, "tanh": 1e-6, "relu": 0.0, "jacobian": 1e-6, "nll": 1e-5, "step": 1e-6}


class Check(NamedTuple):
    name: str
    errors: dict  # lib -> max |autograd or fusedmlp/torch value - the lecture's formula|
    tol: float

    @property
    def ok(self) -> bool:
        # a NaN error fails: NaN <= tol is False
        return all(e <= self.tol for e in self.errors.values())


class Result(NamedTuple):
    checks: list
    # (lib, "lecture" or "stable") -> (-mean log Softmax(z)_y or CrossEntropyLoss(z, y), its
    # gradient's "finite", "NaN" or "inf"), at logits 100 times larger
    unstable: dict
    unstable_reference: float  # their NLL in float64
    # lib -> one (train NLL, test NLL, train accuracy, test accuracy) a row: before training, then
    # after each epoch
    history: dict
    models: dict  # lib -> the trained model


def create_model(d_in: int, h: int, d_out: int) -> torch.nn.Sequential:
    """The lecture's model, with Softmax's dim said. (The lecture's comments give the weight
    matrices as [D_in x H] and [H x D_out]; torch stores W^h as [H, D_in], x W^T + b.)"""
    nn = torch.nn
    return nn.Sequential(
        nn.Linear(d_in, h),
        nn.Tanh(),
        nn.Linear(h, d_out),
        nn.Softmax(dim=1),
    )


def weight_matrices(model: torch.nn.Sequential) -> list:
    """W^h and W^o: the weights of the model's Linears (names survive convert())."""
    return [p for name, p in model.named_parameters() if name.endswith("weight")]


def l2_penalty(model: torch.nn.Sequential, lam: float) -> torch.Tensor:
    """The lecture's lambda (||W^h||^2 + ||W^o||^2)."""
    return lam * sum(w.pow(2).sum() for w in weight_matrices(model))


def activation_derivative(lib: str, act: str, x: torch.Tensor) -> torch.Tensor:
    """d act(x) / dx at the points ``x`` by autograd through ``lib``'s modules: a 1x1 Linear of
    weight 1 and no bias, so that its pre-activation is x itself."""
    layer = scalar_chain(lib, ACTIVATIONS[act][0], [1.0], x.device)
    x = x.detach().clone().requires_grad_()
    layer(x[:, None]).sum().backward()
    return x.grad


def _loss_modules(lib: str):
    return LIBRARIES[lib].nn


def lecture_nll(lib: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-(1/|B|) sum log f(x)_y with f = ``lib``'s Softmax: the log of the probabilities."""
    nn = _loss_modules(lib)
    return nn.NLLLoss()(torch.log(nn.Softmax(dim=1)(z)), y)


def stable_nll(lib: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same NLL by ``lib``'s CrossEntropyLoss on the logits."""
    return _loss_modules(lib).CrossEntropyLoss()(z, y)


def run_checks(device, seed: int) -> tuple[list, dict, float]:
    gen = torch.Generator().manual_seed(seed)
    checks = []
    x = GRID.to(device)
    for act in ACTIVATIONS:
        expected = ACTIVATIONS[act][1](x.double())
        errors = {
            lib: (activation_derivative(lib, act, x).double() - expected).abs().max().item()
            for lib in LIBS
        }
        checks.append(Check(FORMULAS[act], errors, TOLERANCES[act]))

    z = torch.randn(CLASSES, generator=gen).to(device)
    s = torch.softmax(z.double(), 0)
    expected = torch.diag(s) - torch.outer(s, s)
    errors = {}
    for lib in LIBS:
        softmax = _loss_modules(lib).Softmax(dim=-1)
        jacobian = torch.autograd.functional.jacobian(softmax, z)
        errors[lib] = (jacobian.double() - expected).abs().max().item()
    checks.append(Check("softmax Jacobian = diag(s) - s s^T", errors, TOLERANCES["jacobian"]))

    batch = 8
    z = torch.randn(batch, CLASSES, generator=gen).to(device)
    y = torch.randint(CLASSES, (batch,), generator=gen).to(device)
    z64 = z.double()
    expected = (torch.logsumexp(z64, 1) - z64.gather(1, y[:, None])[:, 0]).mean().item()
    onehot = torch.nn.functional.one_hot(y, CLASSES).double()
    expected_grad = (torch.softmax(z64, 1) - onehot) / batch
    value_errors, grad_errors = {}, {}
    for lib in LIBS:
        value_errors[lib] = grad_errors[lib] = 0.0
        for nll in (lecture_nll, stable_nll):
            zg = z.detach().clone().requires_grad_()
            loss = nll(lib, zg, y)
            loss.backward()
            value_errors[lib] = max(value_errors[lib], abs(loss.item() - expected))
            grad_error = (zg.grad.double() - expected_grad).abs().max().item()
            grad_errors[lib] = max(grad_errors[lib], grad_error)
    checks.append(
        Check("-log Softmax(z)_y and CrossEntropyLoss(z, y)", value_errors, TOLERANCES["nll"])
    )
    checks.append(
        Check("d nll/dz = (softmax(z) - onehot(y)) / B", grad_errors, TOLERANCES["jacobian"])
    )

    # the gap between a row's largest logit and its target's is 100 (max - min) > 104 for
    # almost any 10 draws: the target's probability underflows to 0 in float32
    big, y_big = 100 * z, z.argmin(1)
    big64 = big.double()
    reference = (torch.logsumexp(big64, 1) - big64.gather(1, y_big[:, None])[:, 0]).mean()
    unstable = {}
    for lib in LIBS:
        for form, nll in (("lecture", lecture_nll), ("stable", stable_nll)):
            zg = big.detach().clone().requires_grad_()
            loss = nll(lib, zg, y_big)
            loss.backward()
            unstable[lib, form] = (loss.item(), _finiteness(zg.grad))

    errors = {lib: weight_decay_step_gap(lib, device, gen) for lib in LIBS}
    checks.append(
        Check(
            "SGD: + lambda ||W||^2 same as weight_decay 2 lambda",
            errors,
            TOLERANCES["step"],
        )
    )
    return checks, unstable, reference.item()


def _finiteness(t: torch.Tensor) -> str:
    if t.isnan().any():
        return "NaN"
    return "finite" if t.isfinite().all() else "inf"


def weight_decay_step_gap(lib: str, device, gen: torch.Generator, lr: float = 0.5) -> float:
    """Max |difference| between the parameters after one SGD step of ``lib``'s optimizer on
    L + the lecture's L2 term and after one on L alone with weight_decay = 2 lambda on the weight
    matrices (biases undecayed), from the same weights of a small model. L = sum_p <G_p, p> for
    random G_p: the identity holds for any L, and this one costs no kernel launch but the
    optimizer's (under Triton's interpreter the model's would take seconds)."""
    model = create_model(6, 5, 3)
    start = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    slopes = [torch.randn(p.shape, generator=gen).to(device) for p in model.parameters()]
    optim = LIBRARIES[lib].optim
    after = []
    for explicit in (True, False):
        with torch.no_grad():
            for p, v in zip(model.parameters(), start):
                p.copy_(v)
                p.grad = None
        model.to(device)
        opt = optim.SGD(param_groups(model, 0.0 if explicit else 2 * CHECK_LAMBDA), lr=lr)
        loss = sum((g * p).sum() for g, p in zip(slopes, model.parameters()))
        if explicit:
            loss = loss + l2_penalty(model, CHECK_LAMBDA)
        loss.backward()
        opt.step()
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return (after[0] - after[1]).abs().max().item()


def param_groups(model: torch.nn.Sequential, weight_decay: float) -> list:
    """The weight matrices with ``weight_decay``, the biases without (the lecture's Omega)."""
    weights = weight_matrices(model)
    others = [p for p in model.parameters() if all(p is not w for w in weights)]
    return [{"params": weights, "weight_decay": weight_decay}, {"params": others}]


def training_loss(lib: str, kind: str, model, x, y) -> torch.Tensor:
    nn = _loss_modules(lib)
    if kind == "cross-entropy":
        return nn.CrossEntropyLoss()(model[:-1](x), y)
    if kind == "log-softmax":
        return nn.NLLLoss()(nn.LogSoftmax(dim=1)(model[:-1](x)), y)
    return nn.NLLLoss()(torch.log(model(x)), y)


def evaluate(lib: str, model, x, y, n_train: int) -> tuple[float, float, float, float]:
    """(train NLL, test NLL, train accuracy, test accuracy): the mean NLL by the stable form and
    the accuracy of f(x)'s argmax on the first ``n_train`` samples of ``x`` and on the rest.
    One forward pass over both sets: under Triton's interpreter a launch costs more than a row."""
    model.eval()
    with torch.no_grad():
        logits = model[:-1](x)
        nll = _loss_modules(lib).CrossEntropyLoss(reduction="none")(logits, y)
        correct = (model[-1](logits).argmax(1) == y).float()
    model.train()
    train, test = slice(None, n_train), slice(n_train, None)
    return tuple(t[part].mean().item() for t in (nll, correct) for part in (train, test))


def main(argv=None) -> Result:
    """Runs the checks and the training; returns them (see ``Result``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=at_least(1), default=32, help="hidden units H")
    p.add_argument("--epochs", type=at_least(1), default=20)
    p.add_argument("--batch-size", type=at_least(1), default=32)
    p.add_argument("--lr", type=FINITE_POSITIVE, default=0.5, help="SGD's learning rate eta")
    p.add_argument(
        "--l2",
        type=FINITE_NONNEGATIVE,
        default=1e-4,
        help="lambda of the lecture's term lambda (||W^h||^2 + ||W^o||^2), added to the loss",
    )
    p.add_argument(
        "--weight-decay",
        type=FINITE_NONNEGATIVE,
        default=0.0,
        help="SGD's weight_decay on W^h and W^o: --weight-decay 2L takes --l2 L's steps",
    )
    p.add_argument(
        "--loss",
        choices=LOSSES,
        default="cross-entropy",
        help="cross-entropy: CrossEntropyLoss on the logits; log-softmax: LogSoftmax + NLLLoss; "
        "softmax-log: NLLLoss on the log of the Softmax output (the lecture's literal form)",
    )
    p.add_argument(
        "--n-train", type=at_least(1), default=None, help="train on this many samples (default all)"
    )
    p.add_argument(
        "--n-test", type=at_least(1), default=None, help="test on this many samples (default all)"
    )
    add_run_options(p, "PNG of the train and test NLL and accuracy per epoch")
    args = p.parse_args(argv)
    device = set_up(p, args)
    try:
        data = load_digits(seed=args.seed % 2**32)  # numpy's seeds are below 2**32
    except DataError as e:
        p.error(str(e))
    result = exit_on_out_of_memory(
        p,
        device,
        f"--hidden {args.hidden}, --batch-size {args.batch_size}",
        lambda: _experiment(args, device, data),
    )
    exit_if_failed(p, all(c.ok for c in result.checks))
    return result


def _experiment(args, device, data) -> Result:
    print(
        f"checks on {device} (fusedmlp backend {fusedmlp.get_backend()}): max |autograd or value "
        "- the lecture's formula in float64|"
    )
    checks, unstable, big_nll = run_checks(device, args.seed)
    header = f"{'check':<52} {'fusedmlp':>9} {'torch':>9} {'tol':>7}"
    print(header)
    print("-" * len(header))
    for c in checks:
        cells = " ".join(f"{c.errors[lib]:>9.2g}" for lib in LIBS)
        print(f"{c.name:<52} {cells} {c.tol:>7.0g} {'OK' if c.ok else 'FAILED'}")
    print(
        f"(the SGD row: lambda {CHECK_LAMBDA:g}, one step each from the same weights)\n"
        "the same NLL on logits x100 (each target 100 (max - min) below its row's largest), "
        f"float64 {big_nll:.6g}:"
    )
    for form, name in (("lecture", "-log Softmax(z)_y"), ("stable", "CrossEntropyLoss(z, y)")):
        cells = ", ".join(
            f"{unstable[lib, form][0]:.6g} ({lib}, gradient {unstable[lib, form][1]})"
            for lib in LIBS
        )
        print(f"  {name:<23} {cells}")

    def tensors(x, y, n):
        return x[:n].to(device), torch.from_numpy(y[:n]).to(device)

    x_train, y_train = tensors(torch.from_numpy(data.x_train), data.y_train, args.n_train)
    x_test, y_test = tensors(torch.from_numpy(data.x_test), data.y_test, args.n_test)
    n = len(x_train)
    x_all, y_all = torch.cat([x_train, x_test]), torch.cat([y_train, y_test])
    print(
        f"\ndigits: {n} train / {len(x_test)} test samples, {data.num_features} pixels, "
        f"{CLASSES} classes; Linear({data.num_features}, {args.hidden}) -> Tanh -> "
        f"Linear({args.hidden}, {CLASSES}) -> Softmax\n{args.loss} loss + lambda "
        f"(||W^h||^2 + ||W^o||^2), lambda {args.l2:g}, weight_decay {args.weight_decay:g}; SGD "
        f"lr {args.lr:g}, {args.epochs} epochs of batches of {args.batch_size}"
    )
    torch.manual_seed(args.seed)
    reference = create_model(data.num_features, args.hidden, CLASSES).to(device)
    fused = fusedmlp.nn.convert(reference)  # a converted copy: same initial weights
    models = {"fusedmlp": fused, "torch": reference}
    gen = torch.Generator().manual_seed(args.seed)
    orders = [torch.randperm(n, generator=gen).to(device) for _ in range(args.epochs)]

    history = {}
    start = time.perf_counter()
    for lib, model in models.items():
        optim = LIBRARIES[lib].optim
        opt = optim.SGD(param_groups(model, args.weight_decay), lr=args.lr)
        history[lib] = [evaluate(lib, model, x_all, y_all, n)]
        for order in orders:
            for i in range(0, n, args.batch_size):
                idx = order[i : i + args.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = training_loss(lib, args.loss, model, x_train[idx], y_train[idx])
                if args.l2:
                    loss = loss + l2_penalty(model, args.l2)
                loss.backward()
                opt.step()
            history[lib].append(evaluate(lib, model, x_all, y_all, n))
    elapsed = time.perf_counter() - start

    groups = ("train NLL", "test NLL", "train acc %", "test acc %")
    print(("\n" + f"{'':5} |" + " |".join(f" {g:^19}" for g in groups)).rstrip())
    header = f"{'epoch':>5} |" + " |".join(f" {'fusedmlp':>9} {'torch':>9}" for _ in groups)
    print(header)
    print("-" * len(header))
    gap = 0.0
    for epoch, rows in enumerate(zip(history["fusedmlp"], history["torch"])):
        cells = []
        for j, (ours, theirs) in enumerate(zip(*rows)):
            gap = max(gap, rel_diff(ours, theirs))
            if j < 2:
                cells.append(f" {ours:>9.5f} {theirs:>9.5f}")
            else:
                cells.append(f" {100 * ours:>9.2f} {100 * theirs:>9.2f}")
        print(f"{epoch:>5} |" + " |".join(cells))
    penalties = ", ".join(f"{l2_penalty(models[lib], args.l2).item():.4g} ({lib})" for lib in LIBS)
    print(f"epoch 0: before training. lambda (||W^h||^2 + ||W^o||^2) at the end: {penalties}")
    print(f"largest relative difference fusedmlp / torch in the table: {gap:.2g}")
    test_nll = [row[1] for row in history["torch"]]
    best = min(range(len(test_nll)), key=test_nll.__getitem__)
    print(
        f"torch's test NLL is lowest after epoch {best} ({test_nll[best]:.5f}): the lecture "
        "stops when the NLL on a validation set stops decreasing (held out for it, not the test "
        "set as here)"
    )
    print(f"({elapsed:.1f} s)")

    result = Result(checks, unstable, big_nll, history, models)
    if args.plot is not None:
        _plot(args, history)
    return result


def _plot(args, history) -> None:
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (ax, ax_acc) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    epochs = list(range(len(history["torch"])))
    for axis, columns, scale in ((ax, (0, 1), 1), (ax_acc, (2, 3), 100)):
        for color, j in enumerate(columns):
            what = ("train", "test")[color]
            axis.plot(
                epochs,
                [scale * r[j] for r in history["torch"]],
                "-",
                color=f"C{color}",
                label=f"torch, {what}",
            )
        for j in columns:
            # thin, black and on top: in torch's colour it would hide under torch's line
            axis.plot(
                epochs,
                [scale * r[j] for r in history["fusedmlp"]],
                "--",
                color="k",
                lw=0.8,
                marker="x",
                ms=3,
                label="fusedmlp" if j == columns[0] else None,
            )
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean NLL")
    ax.set_title(f"H = {args.hidden}, lambda {args.l2:g}, SGD lr {args.lr:g} (fusedmlp dashed)")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("digits, accuracy of argmax f(x)")
    for a in (ax, ax_acc):
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7)
    save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
