"""The examples (examples/*.py, the lecture's experiments) on tiny budgets: each prints
fusedmlp beside torch, and through the Triton kernels fusedmlp's numbers must be torch's."""

import importlib.util
import pathlib
import sys

import pytest
import torch
from conftest import DEVICE, assert_close

import fusedmlp

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    """examples/<name>.py, loaded as a module (the examples folder is not a package; its files
    import each other as a script run finds them: from their folder, first on sys.path, for
    the time of the load only: names such as ``dropout`` must not shadow other modules)."""
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
    example = importlib.util.module_from_spec(spec)
    # registered as an import would be (dataclasses, pickling look a module up there)
    sys.modules[spec.name] = example
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec.loader.exec_module(example)
    finally:
        sys.path.remove(str(EXAMPLES))
    return example


def _floats(cells):
    return torch.tensor([float(c) for c in cells], dtype=torch.float64)


def test_batchnorm_depth_example_follows_torch(triton_backend, launches, capsys):
    """examples/batchnorm_depth.py on a tiny budget through the fused kernels (Linear-BN-ReLU
    blocks, SGD): both libraries give the same accuracies, to a sample or two of the test set
    (the kernels' rounding may flip a point near the boundary)."""
    example = _example("batchnorm_depth")
    n = 64
    example.main(
        ["--stds", "0.25", "--depth", "2", "--epochs", "2", "--n", str(n)]
        + ["--batch-size", "32", "--device", DEVICE]
    )
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("0.25 |"))
    torch_no_bn, fused_no_bn, torch_bn, fused_bn = (
        float(v.rstrip("%")) for v in row.split("|")[1].split()
    )
    assert abs(torch_no_bn - fused_no_bn) <= 2 * 100 / n, row
    assert abs(torch_bn - fused_bn) <= 2 * 100 / n, row
    assert launches.total > 0


def test_optimizers_example_follows_torch(triton_backend, launches, capsys):
    """examples/optimizers.py (the lecture's gradient-descent, momentum and Adam examples) on a
    few steps, through the fused kernels: every fusedmlp trajectory stays on torch's."""
    example = _example("optimizers")
    example.main(["--steps", "6", "--device", DEVICE])
    rows = [line for line in capsys.readouterr().out.splitlines() if "eta" in line]
    assert len(rows) == len(example.RUNS)
    assert all(float(row.split()[-1]) <= 1e-5 for row in rows), rows
    assert launches.total > 0


def test_vanishing_gradients_example_follows_torch(triton_backend, launches, capsys):
    """The scalar chain's dy/dw1 through fusedmlp's and torch's layers is the lecture's analytic
    product (each sigma' <= 1/4, ReLU's factors 1); in the deep MLP every layer's weight-gradient
    norm through fusedmlp is torch's, and sigmoid's vanish toward the input while ReLU's do not."""
    example = _example("vanishing_gradients")
    depth = 5
    example.main(["--depth", str(depth), "--width", "8", "--batch", "8", "--device", DEVICE])
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]

    chain = {
        cells[0]: cells[1:]
        for cells in lines
        if len(cells) == 8 and cells[0] in ("sigmoid", "relu")
    }
    assert set(chain) == {"sigmoid", "relu"}, lines
    for act, cells in chain.items():
        factors, (analytic, ours, theirs, bound) = _floats(cells[:3]), _floats(cells[3:])
        # printed with 6 significant digits: float32's tolerance covers the rounding
        assert_close(ours, analytic, dtype=torch.float32, atol=0)
        assert_close(theirs, analytic, dtype=torch.float32, atol=0)
        assert analytic > 0
        if act == "sigmoid":
            assert (factors <= 0.25).all() and (factors > 0.2).all(), factors
            assert analytic <= bound
        else:
            assert (factors == 1).all(), factors
            assert_close(analytic, bound, dtype=torch.float32, atol=0)

    # every activation fused into its Linear: fusedmlp's kernels computed it, not torch's module
    fused = next(line for line in out.splitlines() if line.startswith("activations fused"))
    hidden = f"{depth - 1}/{depth - 1}"
    assert fused.split(": ")[1].split(", ") == [f"{a} {hidden}" for a in example.ACTIVATIONS]

    rows = [cells for cells in lines if cells and cells[0].isdigit() and len(cells) == 9]
    assert [int(cells[0]) for cells in rows] == list(range(1, depth + 1)), lines
    norms = torch.stack([_floats(cells[1:]) for cells in rows])  # [layer, (act, lib)]
    assert (norms > 0).all()
    # printed with 5 significant digits: two roundings, twice float32's tolerance
    assert_close(norms[:, 0::2], norms[:, 1::2], dtype=torch.float32, scale=2, atol=0)
    ratio = _floats(next(cells for cells in lines if cells and cells[0] == "1/L")[1:])
    assert_close(ratio, norms[0] / norms[-1], dtype=torch.float32, scale=4, atol=0)
    sigmoid, relu = norms[:, 1], norms[:, 5]  # torch's columns, fusedmlp's equal them
    assert (sigmoid[1:] > sigmoid[:-1]).all(), sigmoid  # shrinking at every layer toward the input
    assert sigmoid[0] / sigmoid[-1] < 0.02 * (relu[0] / relu[-1]), (sigmoid, relu)
    assert launches.total > 0


def test_dropout_example_follows_torch(triton_backend, launches, capsys):
    """The REPL session's x.grad is the closed form 4 y / ||y_row|| for fusedmlp's kernels (and
    model.train(False) turns them off), and the Spatial Dropout session's channels are whole;
    the noisy-disc table has a row per p, and with p = 0 (nothing random) fusedmlp's
    accuracies and trained weights are torch's."""
    example = _example("dropout")
    ps = ["0", "0.5", "0.9"]
    # one batch an epoch, 3 steps a p: under the interpreter a step takes ~0.5 s
    rows = example.main(
        ["--ps", *ps, "--n", "16", "--n-test", "40", "--width", "16", "--epochs", "3"]
        + ["--batch-size", "16", "--lr", "0.05", "--device", DEVICE]
    )
    out = capsys.readouterr().out
    checks = [line for line in out.splitlines() if line.startswith("check fusedmlp:")]
    assert len(checks) == 3 and all(line.endswith("-> OK") for line in checks), out
    assert "Dropout2d: every channel all 0 or all 2: yes" in checks[2], out

    lines = [line.split("|") for line in out.splitlines() if line.count("|") == 2]
    table = {line[0].strip(): line[1].split() + line[2].split() for line in lines[2:]}
    assert list(table) == ps, out
    train_fused, train_torch, test_fused, test_torch = table["0"]
    assert (train_fused, test_fused) == (train_torch, test_torch), out
    # Without dropout nothing is random: fusedmlp's kernels took torch's steps. Adam's first
    # steps divide each gradient by its own magnitude, which lifts the GEMMs' rounding
    # differences (~1e-7) on the smallest gradients (seen: 4e-5 at width 64): 10x the tolerance.
    assert [r.p for r in rows] == [0.0, 0.5, 0.9]
    fused, reference = rows[0].models["fusedmlp"], rows[0].models["torch"]
    torch.manual_seed(0)
    initial = example.create_model(0.0, 16).to(DEVICE)
    for (name, ours), theirs, before in zip(
        fused.named_parameters(), reference.parameters(), initial.parameters()
    ):
        assert_close(ours, theirs, scale=10, msg=name)
        assert (ours - before).abs().max() > 1e-2, name  # and it trained
    assert launches["_dropout_kernel"] > 0 and launches.total > launches["_dropout_kernel"]

    # the function behind those lines, against the closed form worked out here: a row with k
    # entries kept has norm 4 sqrt(k), so x.grad = 4 * 4 / (4 sqrt(k)) = 4 / sqrt(k) there
    result = example.repl_example(fusedmlp, DEVICE, p=0.75, seed=0)
    kept = result.y != 0
    assert 0 < int(kept.sum()) < kept.numel()  # a mask that drops some and keeps some
    assert torch.equal(result.y, 4.0 * kept)
    per_row = 4.0 / kept.sum(1, keepdim=True).clamp_min(1).sqrt()
    assert_close(result.grad, torch.where(kept, per_row, torch.zeros_like(per_row)))
    assert result.ok and result.off_in_eval


def test_universal_example_follows_torch(triton_backend, launches, capsys):
    """A few full-batch Adam steps for q = 1 and 8 through the fused kernels: fusedmlp's train
    and test MSEs (and its fits) are torch's within fp32's tolerance, the printed table says the
    same, and 8 units already fit far better than one."""
    example = _example("universal_approximation")
    # the converted model is the one the docstring describes: the ReLU fused into the Linear
    fused = fusedmlp.nn.convert(example.create_model(3))
    assert type(fused[0]) is fusedmlp.nn.Linear and fused[0].activation == "relu"
    assert type(fused[1]) is torch.nn.Identity

    units = [1, 8]
    rows = example.main(
        ["--units", *map(str, units), "--steps", "10", "--lr", "0.1", "--n", "16"]
        + ["--test-points", "32", "--device", DEVICE]
    )
    out = capsys.readouterr().out
    assert [q for q, _, _ in rows] == units
    for q, errors, preds in rows:
        assert_close(
            torch.tensor(errors["fusedmlp"]), torch.tensor(errors["torch"]), msg=f"q = {q}"
        )
        assert_close(preds["fusedmlp"], preds["torch"], msg=f"q = {q}")

    table = [line.split("|") for line in out.splitlines() if line.count("|") == 3]
    assert [cells[0].strip() for cells in table] == ["q", *map(str, units)]
    for (q, errors, _), cells in zip(rows, table[1:]):
        printed = [float(v) for v in cells[1].split() + cells[2].split()]
        expected = [errors["fusedmlp"][0], errors["torch"][0]]
        expected += [errors["fusedmlp"][1], errors["torch"][1]]
        assert printed == pytest.approx(expected, rel=1e-4), q
        assert float(cells[3]) <= 1e-4, q  # the "max rel diff" column

    train = {q: errors for q, errors, _ in rows}
    for lib in ("fusedmlp", "torch"):
        assert train[8][lib][0] < 0.5 * train[1][lib][0], (lib, train)
    assert launches.total > 0
    assert launches["_adam_kernel"] > 0, dict(launches)


@pytest.mark.parametrize(
    "argv",
    [
        ["--units", "0"],
        ["--units", "4", "x"],
        ["--steps", "0"],
        ["--n", "-1"],
        ["--test-points", "0"],
        ["--noise", "nan"],
        ["--lr", "0"],
        ["--seed", str(2**64)],
        ["--device", "tpu"],
    ],
)
def test_universal_example_refuses_bad_options(argv, capsys):
    """Bad options: argparse's usage error (exit 2) naming the option, before any training."""
    with pytest.raises(SystemExit) as e:
        _example("universal_approximation").main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0]}" in err, err


def test_universal_example_refuses_plot_folder(tmp_path, capsys):
    """``--plot`` naming a folder is refused before the run, as the other examples refuse it."""
    with pytest.raises(SystemExit) as e:
        _example("universal_approximation").main(["--plot", str(tmp_path), "--device", "cpu"])
    assert e.value.code == 2
    assert "argument --plot" in capsys.readouterr().err


def test_dropout2d_example_drops_whole_channels(triton_backend, launches):
    """The Spatial Dropout session's function through fusedmlp's kernels: on the lecture's
    ones(2, 3, 2, 2) and on a larger input, each (sample, channel) map is all 0 or all 2, some
    kept and some dropped, and the result says so."""
    example = _example("dropout")
    for shape in [(2, 3, 2, 2), (4, 16, 3, 5)]:
        result = example.spatial_dropout_example(fusedmlp, DEVICE, shape=shape, p=0.5, seed=0)
        assert result.y.shape == shape
        maps = result.y.flatten(2)
        first = maps[:, :, :1]
        assert torch.equal(maps, first.expand_as(maps)), result.y  # constant over each map
        kept = first.squeeze(2) == 2
        assert torch.equal(first.squeeze(2), 2.0 * kept), result.y
        assert result.whole_channels and result.ok and result.kept == int(kept.sum())
        if shape[1] > 3:  # 64 channels: p = 0.5 keeps neither none nor all
            assert 16 <= result.kept <= 48, result.kept
    assert launches["_dropout_kernel"] > 0


def test_batchnorm_example_follows_torch(triton_backend, launches, capsys):
    """examples/batchnorm.py on tiny inputs through fusedmlp's kernels: its outputs and running
    statistics are torch's, and the lecture's claims hold, checked here against float64
    formulas: in training mode y.mean(0) = bias and the biased std = weight; one pass leaves
    0.1 x's mean and 0.9 + 0.1 its unbiased variance; momentum=None over equal batches leaves
    x's mean and the batches' mean unbiased variance, which eval mode uses; BatchNorm2d's
    channels come out with mean 0 and std 1."""
    example = _example("batchnorm")
    n, batch, shape = 48, 16, (2, 3, 4, 5)
    results = example.main(
        ["--n", str(n), "--batch-size", str(batch), "--shape2d", *map(str, shape)]
        + ["--device", DEVICE]
    )
    out = capsys.readouterr().out.splitlines()
    checks = [line for line in out if line.startswith("check fusedmlp:")]
    assert len(checks) == 3 + 2 + 6 + 2 and all(line.endswith("-> OK") for line in checks), out
    sames = [line for line in out if line.startswith("fusedmlp vs torch")]
    assert len(sames) == 4 and all("-> same within" in line for line in sames), out
    assert all(results.same.values()), results.same

    weight = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, device=DEVICE)
    bias = torch.tensor([2.0, 4.0, 8.0], dtype=torch.float64, device=DEVICE)
    eps = 1e-5
    x = results.x.double()
    assert x.shape == (n, 3)

    ours, theirs = results.train["fusedmlp"], results.train["torch"]
    for stat in ("y", "running_mean", "running_var"):
        assert_close(getattr(ours, stat), getattr(theirs, stat), msg=stat)
    normalised = (x - x.mean(0)) / (x.var(0, correction=0) + eps).sqrt()
    assert_close(ours.y.double(), normalised * weight + bias, dtype=torch.float32)
    assert_close(ours.y.double().mean(0), bias, dtype=torch.float32)
    assert_close(ours.y.double().std(0, correction=0), weight, dtype=torch.float32)
    assert_close(ours.running_mean.double(), 0.1 * x.mean(0), dtype=torch.float32)
    assert_close(ours.running_var.double(), 0.9 + 0.1 * x.var(0), dtype=torch.float32)

    ours, theirs = results.inference["fusedmlp"], results.inference["torch"]
    for stat in ("y", "running_mean", "running_var"):
        assert_close(getattr(ours, stat), getattr(theirs, stat), msg=stat)
    assert ours.rows == n
    assert_close(ours.running_mean.double(), x.mean(0), dtype=torch.float32)
    batch_vars = x.view(n // batch, batch, 3).var(1)
    assert_close(ours.running_var.double(), batch_vars.mean(0), dtype=torch.float32)
    expected = (x - x.mean(0)) / (batch_vars.mean(0) + eps).sqrt() * weight + bias
    assert_close(ours.y.double(), expected, dtype=torch.float32)

    x2d = results.x2d.double()
    assert x2d.shape == shape
    ours, theirs = results.conv["fusedmlp"], results.conv["torch"]
    for stat in ("y", "running_mean", "running_var"):
        assert_close(getattr(ours, stat), getattr(theirs, stat), msg=stat)
    assert ours.sizes == (torch.Size(shape), torch.Size([shape[1]]), torch.Size([shape[1]]))
    dims = (0, 2, 3)
    mean = x2d.mean(dims, keepdim=True)
    expected = (x2d - mean) / (x2d.var(dims, correction=0, keepdim=True) + eps).sqrt()
    assert_close(ours.y.double(), expected, dtype=torch.float32)
    y = ours.y.double()
    assert_close(y.mean(dims), torch.zeros_like(y.mean(dims)), dtype=torch.float32)
    assert_close(y.std(dims, correction=0), torch.ones_like(y.mean(dims)), dtype=torch.float32)
    assert launches["_bn_forward_kernel"] > 0 and launches.total > 0, dict(launches)


def test_classifier_example_follows_torch(triton_backend, launches, capsys):
    """examples/classifier.py through the fused kernels: each activation's derivative (fused
    into a 1x1 Linear), the softmax Jacobian, the NLL and its gradient, and the L2 term's SGD
    step are the lecture's formulas; the log of the Softmax output is inf (gradient NaN) where
    CrossEntropyLoss stays finite and exact; a few SGD steps of the one-hidden-layer Tanh
    network on digits give torch's NLLs and accuracies, and the printed table says so."""
    # the digits come with scikit-learn: CI installs it (the dev extras), gpu_check's machines
    # may not have it (as test_train_cli's digits tests)
    pytest.importorskip("sklearn")
    example = _example("classifier")
    # the converted model is the one the docstring describes: the Tanh fused into the Linear
    fused = fusedmlp.nn.convert(example.create_model(4, 3, 2))
    assert type(fused[0]) is fusedmlp.nn.Linear and fused[0].activation == "tanh"
    assert type(fused[1]) is torch.nn.Identity and type(fused[3]) is fusedmlp.nn.Softmax

    epochs = 2
    # tiny: the cross-entropy and softmax kernels run a program a row, 10-20 ms each under the
    # interpreter
    result = example.main(
        ["--hidden", "8", "--epochs", str(epochs), "--n-train", "12", "--n-test", "6"]
        + ["--batch-size", "6", "--device", DEVICE]
    )
    out = capsys.readouterr().out

    assert len(result.checks) == 7
    for check in result.checks:
        assert check.errors["fusedmlp"] <= check.tol, (check.name, check.errors)
    verdicts = [line for line in out.splitlines() if line.endswith((" OK", " FAILED"))]
    assert len(verdicts) == 7 and all(line.endswith(" OK") for line in verdicts), out
    assert result.unstable["fusedmlp", "lecture"] == (float("inf"), "NaN")
    value, gradient = result.unstable["fusedmlp", "stable"]
    assert gradient == "finite"
    assert value == pytest.approx(result.unstable_reference, rel=1e-6)

    ours, theirs = (torch.tensor(result.history[lib], dtype=torch.float64) for lib in example.LIBS)
    assert ours.shape == (epochs + 1, 4)  # (train NLL, test NLL, train acc, test acc) a row
    assert_close(ours, theirs, dtype=torch.float32)
    assert ours[-1, 0] < ours[0, 0] - 0.1, ours  # it trained
    model = result.models["fusedmlp"]
    assert type(model[0]) is fusedmlp.nn.Linear and model[0].activation == "tanh"

    table = [line.split("|") for line in out.splitlines() if line.count("|") == 4]
    rows = [cells for cells in table if cells[0].strip().isdigit()]
    assert [int(cells[0]) for cells in rows] == list(range(epochs + 1)), out
    for epoch, cells in enumerate(rows):
        printed = _floats(v for group in cells[1:] for v in group.split())
        expected = torch.stack([ours[epoch], theirs[epoch]], 1).flatten()  # as the columns
        # NLLs printed with 5 decimals, accuracies as percentages with 2
        assert_close(printed[:4], expected[:4], rtol=0, atol=5e-6, msg=f"{epoch}")
        assert_close(printed[4:], 100 * expected[4:], rtol=0, atol=5e-3, msg=f"{epoch}")
    assert launches.total > 0
    assert launches["_ce_fwd_kernel"] > 0 and launches["_sgd_kernel"] > 0, dict(launches)


@pytest.mark.parametrize(
    "argv",
    [
        ["--hidden", "0"],
        ["--epochs", "0"],
        ["--batch-size", "0"],
        ["--lr", "0"],
        ["--l2", "-1"],
        ["--weight-decay", "nan"],
        ["--loss", "mse"],
        ["--n-train", "0"],
        ["--device", "tpu"],
    ],
)
def test_classifier_example_refuses_bad_options(argv, capsys):
    """Bad options: argparse's usage error (exit 2) naming the option, before any check runs."""
    with pytest.raises(SystemExit) as e:
        _example("classifier").main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert f"argument {argv[0]}" in captured.err and not captured.out, captured
