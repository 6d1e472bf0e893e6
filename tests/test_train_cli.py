"""`fusedmlp train`: help without extras, tiny runs on every data source, clear data errors."""

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

from fusedmlp.cli import data as cli_data
from fusedmlp.cli.main import main

TINY = ["--epochs", "1", "--hidden", "8", "--batch-size", "32", "--no-progress", "--threads", "1"]


def test_help_works_without_optional_extras():
    code = (
        "import sys\n"
        "for name in ('sklearn', 'matplotlib', 'tqdm'):\n"
        "    sys.modules[name] = None  # import of it now fails\n"
        "from fusedmlp.cli.main import main\n"
        "try:\n"
        "    main(['train', '--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for option in (
        "--dataset",
        "--data-dir",
        "--hidden",
        "--no-batchnorm",
        "--no-compare",
        "--plot",
    ):
        assert option in res.stdout


def test_tiny_run_compares_and_plots(tmp_path, capsys):
    plot = tmp_path / "loss.png"
    assert main(["train", "--dataset", "disc", *TINY, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "epoch   1/1" in out and "fusedmlp: loss" in out and "torch: loss" in out
    assert "test accuracy" in out and "time per step" in out and "speed ratio" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fusedmlp_and_torch_runs_match(capsys):
    """Same initial weights, batches and dropout draws: the two columns agree."""
    args = ["train", "--dataset", "disc", "--epochs", "2", "--hidden", "16", "16", *TINY[-3:]]
    assert main([*args, "--optimizer", "sgd", "--lr", "0.1", "--dropout", "0"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch")]
    for line in lines:
        fused, torch_part = line.split("fusedmlp:")[1].split("torch:")
        loss_f = float(fused.split()[1])
        loss_t = float(torch_part.split()[1])
        assert loss_f == pytest.approx(loss_t, abs=2e-4)


def test_digits_no_compare(capsys):
    pytest.importorskip("sklearn")
    argv = ["train", *TINY, "--no-compare", "--no-batchnorm", "--dropout", "0.2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "digits: 1438 train / 359 test samples, 64 features, 10 classes" in out
    assert "torch: loss" not in out and "speed ratio" not in out


def test_npz_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float64)
    y = (x[:, 0] > 0).astype(np.int32)
    path = tmp_path / "mine.npz"
    np.savez(path, X=x, y=y)
    assert main(["train", "--data", str(path), *TINY]) == 0
    assert "mine.npz: 48 train / 12 test samples, 5 features, 2 classes" in capsys.readouterr().out


def _write_idx(path, array, compress):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(">u1").tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def test_mnist_idx_files_gz_and_raw(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i, (stem, n) in enumerate((("train", 40), ("t10k", 10))):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        labels[:10] = np.arange(10)
        _write_idx(tmp_path / f"{stem}-images-idx3-ubyte", images, compress=i == 0)
        _write_idx(tmp_path / f"{stem}-labels-idx1-ubyte", labels, compress=i == 1)
    ds = cli_data.load_mnist(str(tmp_path))
    assert ds.x_train.shape == (40, 784) and ds.x_test.shape == (10, 784)
    assert ds.x_train.max() <= 1.0 and ds.num_classes == 10
    assert main(["train", "--data-dir", str(tmp_path), *TINY, "--no-compare"]) == 0
    assert "mnist: 40 train / 10 test samples, 784 features, 10 classes" in capsys.readouterr().out


def _error(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code not in (0, None)
    return str(info.value.code)


def test_clear_errors_for_missing_data(tmp_path):
    missing = tmp_path / "nope.npz"
    msg = _error(["train", "--data", str(missing), *TINY])
    assert "data file not found" in msg and str(missing) in msg
    msg = _error(["train", "--data-dir", str(tmp_path / "nodir"), *TINY])
    assert "data directory not found" in msg and "nodir" in msg
    msg = _error(["train", "--data-dir", str(tmp_path), *TINY])
    assert (
        os.path.join(str(tmp_path), "train-images-idx3-ubyte") in msg and "never downloads" in msg
    )
    msg = _error(["train", "--dataset", "mnist", *TINY])
    assert "--data-dir" in msg
    bad = tmp_path / "bad.npz"
    np.savez(bad, features=np.zeros((4, 2)))
    msg = _error(["train", "--data", str(bad), *TINY])
    assert "'X' and 'y'" in msg and "features" in msg
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    assert "cannot read" in _error(["train", "--data", str(garbage), *TINY])
    # an unwritable --plot is refused before any training, not after it
    msg = _error(["train", "--plot", str(tmp_path / "no" / "such" / "loss.png"), *TINY])
    assert "cannot write the plot" in msg and "no folder" in msg


@pytest.mark.parametrize("argv", [["train", "--hidden", str(2**64)],
                                  ["train", "--hidden", "8", str(2**62)],
                                  ["train", "--threads", str(10**20)],
                                  ["bench", "--quick", "--threads", str(10**20)]])  # fmt: skip
def test_numbers_beyond_a_c_int_are_argparse_errors(argv, capsys):
    # torch took them as C ints: a TypeError ("Overflow when unpacking long long") traceback
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "below 2**31" in capsys.readouterr().err


def test_bad_options_exit_nonzero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--hidden", "0"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["train", "--dropout", "1.5"])
    assert info.value.code == 2
    assert "--dropout" in capsys.readouterr().err


def test_cuda_graph_needs_a_cuda_device():
    # refused before any data is read or any step runs
    msg = _error(["train", "--cuda-graph", "--device", "cpu", *TINY])
    assert "--cuda-graph needs a CUDA device" in msg and "cpu" in msg


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    """torch.cuda's streams and graph capture replaced by CPU stand-ins, for ``--cuda-graph``'s
    orchestration: the "capture" runs nothing, a "replay" runs the captured step again (its
    gradients written, not accumulated, as the captured kernels write them). Returns the list
    of captured steps."""
    import contextlib

    import torch

    from fusedmlp.cli import train as T

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

    captured = []

    def capture(fn):
        out = torch.full((), float("nan"))

        class Graph:
            def replay(self):
                fn.__self__.opt.zero_grad(set_to_none=True)
                out.copy_(fn())

        captured.append(fn)
        return Graph(), out

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(T, "_capture", capture)
    return captured


def test_cuda_graph_steps_replay_what_the_eager_loop_computes(fake_cuda_graphs, capsys):
    # Warm-up steps, then one capture whose replay serves the same batch and every later one:
    # the same losses and parameters as the plain loop over the same batches
    import argparse
    import copy

    import torch

    import fusedmlp
    from fusedmlp.cli import train as T

    torch.manual_seed(0)
    x, y = torch.randn(100, 6), torch.randint(0, 3, (100,))
    net = fusedmlp.nn.MLP(6, [16], 3, batchnorm=True)
    twin = copy.deepcopy(net)
    loss_fn = fusedmlp.nn.CrossEntropyLoss()
    batches = [torch.randperm(100)[:16] for _ in range(7)]
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    eager = []
    for idx in batches:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x[idx]), y[idx])
        loss.backward()
        opt.step()
        eager.append(loss.item())
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    step = T._GraphedStep(twin, loss_fn, opt, x, y, 16)
    graphed = [step(idx).item() for idx in batches]
    assert len(fake_cuda_graphs) == 1 and step.warm == T._GraphedStep.WARMUP
    assert graphed == eager
    for a, b in zip(twin.parameters(), net.parameters()):
        assert torch.equal(a, b)

    # the CLI's loop through it, both models: full batches only (100 // 16), the line saying so,
    # one capture per model (in the first epoch), the columns as close as in the eager runs
    parser = argparse.ArgumentParser()
    T.add_arguments(parser)
    args = parser.parse_args(
        ["--epochs", "2", "--hidden", "8", "--batch-size", "16", "--optimizer", "sgd",
         "--dropout", "0", "--no-progress", "--cuda-graph"]
    )  # fmt: skip
    ds = cli_data.load_disc(n_train=100, n_test=50)
    assert T._train(args, ds, torch.device("cpu"), "auto") == 0
    out = capsys.readouterr().out
    assert "2 epochs x 6 steps of 16" in out and "CUDA graph replay" in out
    assert len(fake_cuda_graphs) == 3
    for line in [ln for ln in out.splitlines() if ln.startswith("epoch")]:
        fused, torch_part = line.split("fusedmlp:")[1].split("torch:")
        assert float(fused.split()[1]) == pytest.approx(float(torch_part.split()[1]), abs=2e-4)


@pytest.mark.parametrize("batchnorm, steps", [("--batchnorm", 6), ("--no-batchnorm", 7)])
def test_a_last_batch_of_one_sample_is_dropped_only_with_batchnorm(batchnorm, steps, capsys):
    # 97 train samples in batches of 16: 6 full ones and 1 left over, which BatchNorm refuses
    import argparse

    import torch

    from fusedmlp.cli import train as T

    ds = cli_data.load_disc(n_train=97, n_test=20)
    parser = argparse.ArgumentParser()
    T.add_arguments(parser)
    args = parser.parse_args(
        ["--epochs", "1", "--hidden", "8", "--batch-size", "16", "--no-progress",
         "--no-compare", batchnorm]
    )  # fmt: skip
    assert T._train(args, ds, torch.device("cpu"), "auto") == 0
    assert f"1 epochs x {steps} steps of 16" in capsys.readouterr().out


def test_batchnorm_refuses_batches_of_one(tmp_path):
    msg = _error(["train", "--dataset", "disc", *TINY, "--no-compare", "--batch-size", "1"])
    assert "BatchNorm needs batches of at least 2 samples" in msg
    two = tmp_path / "two.npz"  # 1 train sample after the split
    np.savez(two, X=np.zeros((2, 3)), y=np.array([0, 1]))
    msg = _error(["train", "--data", str(two), *TINY, "--no-compare"])
    assert "BatchNorm needs batches of at least 2 samples" in msg


@pytest.mark.parametrize(
    "x, y, expected",
    [
        (np.array([["a", "b"]] * 10), np.zeros(10, int), "must hold numbers"),
        (np.float32(3), np.zeros(10, int), "arrays of samples"),
        (np.zeros((10, 0)), np.zeros(10, int), "no features"),
        # 2**63 wraps negative in int64; 10**12 classes would be a 512 TB output layer
        (
            np.zeros((10, 2)),
            np.array([2**63] + [0] * 9, np.uint64),
            "class label 9223372036854775808",
        ),
        (np.zeros((10, 2)), np.array([0] * 9 + [10**12]), "allow at most 100 classes"),
    ],
)
def test_malformed_npz_gives_a_data_error(tmp_path, x, y, expected):
    path = tmp_path / "bad.npz"
    np.savez(path, X=x, y=y)
    msg = _error(["train", "--data", str(path), *TINY, "--no-compare"])
    assert expected in msg and "bad.npz" in msg


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_gzipped_idx_gives_a_data_error(tmp_path, damage):
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((40, 28, 28), np.uint8), False)
    raw = bytearray(gzip.compress((tmp_path / "train-images-idx3-ubyte").read_bytes()))
    if damage == "truncate":
        raw = raw[: len(raw) // 2]  # EOFError from gzip
    else:
        raw[10] = 0xFF  # past the 10-byte header: an invalid deflate block type, zlib.error
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(bytes(raw))
    msg = _error(["train", "--data-dir", str(tmp_path), *TINY, "--no-compare"])
    assert "cannot read" in msg and "train-images-idx3-ubyte.gz" in msg


def test_triton_backend_on_cpu_without_the_interpreter_fails_up_front(monkeypatch):
    pytest.importorskip("triton")
    from fusedmlp.kernels import launch

    monkeypatch.setattr(launch, "interpreter_active", lambda: False)
    argv = ["train", "--dataset", "disc", *TINY, "--no-compare", "--device", "cpu"]
    msg = _error([*argv, "--backend", "triton"])
    assert "interpreter is off" in msg


def test_a_device_other_than_cpu_or_cuda_is_refused():
    msg = _error(["train", "--dataset", "disc", *TINY, "--device", "mps"])
    assert "unsupported --device 'mps'" in msg


def test_unknown_plot_format_is_refused_before_training(tmp_path):
    pytest.importorskip("matplotlib")
    msg = _error(["train", "--dataset", "disc", *TINY, "--plot", str(tmp_path / "loss.xyz")])
    assert "cannot write the plot" in msg and "'xyz'" in msg and "png" in msg


@pytest.mark.parametrize(
    "option, value", [("--seed", "-5"), ("--seed", str(10**15)), ("--momentum", "-1"),
                      ("--momentum", "nan")]
)  # fmt: skip
def test_bad_seed_and_momentum_are_argparse_errors(option, value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--dataset", "disc", *TINY, "--optimizer", "sgd", option, value])
    assert info.value.code == 2
    assert option in capsys.readouterr().err


# --- adversarial inputs (a helper's probe): each a one-line error, never a traceback --------


def test_lr_must_be_finite(capsys):
    for value in ("inf", "1e309"):
        with pytest.raises(SystemExit) as info:
            main(["train", "--dataset", "disc", *TINY, "--lr", value])
        assert info.value.code == 2
        assert "--lr" in capsys.readouterr().err


def test_a_diverged_run_says_so(capsys):
    assert main(["train", "--dataset", "disc", *TINY, "--no-compare", "--lr", "1e30"]) == 0
    assert "training diverged" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arrays, expected",
    [
        ({"X": np.where(np.eye(10, 3) > 0, np.nan, 0.0), "y": np.arange(10) % 2}, "NaN or infinite"),
        ({"X": np.full((10, 3), 1e300), "y": np.arange(10) % 2}, "NaN or infinite"),
        ({"X": np.ones((10, 3)) + 1j, "y": np.arange(10) % 2}, "must hold real numbers"),
        ({"X": np.ones((10, 3)), "y": np.zeros(10, int)}, "at least two classes"),
        (
            {"X_train": np.ones((8, 3)), "y_train": np.arange(8) % 2,
             "X_test": np.ones((4, 2)), "y_test": np.arange(4) % 2},
            "train samples have 3 features but test samples have 2",
        ),
        (
            {"X_train": np.ones((8, 3)), "y_train": np.arange(7) % 2,
             "X_test": np.ones((4, 3)), "y_test": np.arange(4) % 2},
            "the train set's X has 8 samples but its y has 7",
        ),
    ],
)  # fmt: skip
def test_more_malformed_npz(tmp_path, arrays, expected):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    msg = _error(["train", "--data", str(path), *TINY, "--no-compare"])
    assert expected in msg and "bad.npz" in msg


def test_npz_that_is_not_one(tmp_path):
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((10, 2)))
    assert "single array (.npy)" in _error(["train", "--data", str(npy), *TINY])
    text = tmp_path / "x.npz"
    text.write_text("hello")  # np.load would try it as a pickle
    msg = _error(["train", "--data", str(text), *TINY])
    assert "cannot read" in msg and "not a zip archive" in msg and "pickle" not in msg
    assert "is a directory" in _error(["train", "--data", str(tmp_path), *TINY])
    msg = _error(["train", "--data-dir", str(text), *TINY])
    assert "is a file, not a directory" in msg


def test_boolean_labels_are_classes_0_and_1(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(40, 3))
    path = tmp_path / "b.npz"
    np.savez(path, X=x, y=x[:, 0] > 0)
    assert main(["train", "--data", str(path), *TINY, "--no-compare"]) == 0
    assert "2 classes" in capsys.readouterr().out


def _mnist_dir(path, test_side=28, train_labels=40):
    rng = np.random.default_rng(0)
    for stem, n, side in (("train", 40, 28), ("t10k", 10, test_side)):
        _write_idx(path / f"{stem}-images-idx3-ubyte", rng.integers(0, 256, (n, side, side),
                   dtype=np.uint8), False)  # fmt: skip
        labels = np.arange(train_labels if stem == "train" else n, dtype=np.uint8) % 10
        _write_idx(path / f"{stem}-labels-idx1-ubyte", labels, False)


def test_broken_idx_files(tmp_path):
    _mnist_dir(tmp_path, test_side=20)  # test images of another size than the train images
    msg = _error(["train", "--data-dir", str(tmp_path), *TINY, "--no-compare"])
    assert "784 features but test samples have 400" in msg
    _mnist_dir(tmp_path, train_labels=30)
    msg = _error(["train", "--data-dir", str(tmp_path), *TINY, "--no-compare"])
    assert "train-images-idx3-ubyte holds 40 images but" in msg
    assert "train-labels-idx1-ubyte holds 30 labels" in msg
    _mnist_dir(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(bytes([0, 0, 8, 3, 0, 0]))  # the header cut short
    msg = _error(["train", "--data-dir", str(tmp_path), *TINY, "--no-compare"])
    assert "truncated IDX file" in msg and "needs 16" in msg
    images.write_bytes(bytes([0, 0, 8, 3]) + b"\xff" * 12)  # np.prod overflowed on this
    msg = _error(["train", "--data-dir", str(tmp_path), *TINY, "--no-compare"])
    assert f"needs {(2**32 - 1) ** 3} bytes" in msg
    _mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 0, 5]))  # a 0-d array
    msg = _error(["train", "--data-dir", str(tmp_path), *TINY, "--no-compare"])  # was len()'s
    assert "t10k-labels-idx1-ubyte" in msg and "1-D" in msg  # TypeError


def test_plot_paths(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = ["train", "--dataset", "disc", *TINY, "--no-compare"]
    assert "needs a file name" in _error([*argv, "--plot", ""])
    assert "it is a folder" in _error([*argv, "--plot", str(tmp_path)])
    assert "it is a folder" in _error([*argv, "--plot", str(tmp_path / "new") + "/"])
    # no extension: a PNG at exactly that path (savefig appends ".png" unless told the format)
    plot = tmp_path / "curves"
    assert main([*argv, "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "curves.png").exists()
    assert f"plot     {plot}" in capsys.readouterr().out


def test_cuda_index_beyond_the_devices(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    msg = _error(["train", "--dataset", "disc", *TINY, "--device", "cuda:3"])
    assert "1 CUDA device(s)" in msg


def test_out_of_memory_is_one_line_and_other_errors_stay_visible(monkeypatch):
    from fusedmlp.cli import train as T

    def oom(*args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8")

    monkeypatch.setattr(T, "_train", oom)
    msg = _error(["train", "--dataset", "disc", *TINY, "--no-compare"])
    assert "out of memory on cpu" in msg and "--hidden 8" in msg

    def bug(*args):
        raise RuntimeError("some bug")

    monkeypatch.setattr(T, "_train", bug)
    with pytest.raises(RuntimeError, match="some bug"):
        main(["train", "--dataset", "disc", *TINY, "--no-compare"])


def test_interrupt_exits_130(monkeypatch, capsys):
    from fusedmlp.cli import train as T

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "run", interrupted)
    assert main(["train", *TINY]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_output_piped_into_head_ends_without_a_traceback():
    cmd = [sys.executable, "-m", "fusedmlp", "train", "--dataset", "disc", "--epochs", "3",
           "--hidden", "8", "--batch-size", "8", "--no-progress", "--no-compare"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"data")
    proc.stdout.close()  # `| head -1`: the reader leaves while the epochs still print
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) != 0
    assert "Traceback" not in err, err


def test_batchnorm_depth_example_refuses_bad_values_and_runs_tiny(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "batchnorm_depth.py")
    tiny = ["--stds", "0.1", "--depth", "1", "--width", "4", "--epochs", "1", "--n", "20"]
    res = subprocess.run([sys.executable, script, *tiny, "--batch-size", "1", "--depth", "-1",
                          "--device", "cpu"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2 and "--batch-size" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, script, *tiny, "--plot", str(tmp_path / "no" / "p.png")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2 and "no folder" in res.stderr
    res = subprocess.run([sys.executable, script, *tiny, "--plot", str(tmp_path / "p.xyz")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    # an unknown format: refused up front, not matplotlib's traceback after the experiment
    assert res.returncode == 2 and "--plot" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, script, *tiny, "--plot", str(tmp_path / "p.")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0 and "weight std" in res.stdout, res.stderr
    assert (tmp_path / "p.").stat().st_size > 0  # where it said, not at "p.png"
    assert not (tmp_path / "p.png").exists()


# --- a CLI sweep (a helper's probe): silently wrong runs, misleading messages, late errors ---


def test_momentum_with_adam_is_refused_not_ignored(capsys):
    # Adam has no momentum: the option was silently dropped
    msg = _error(["train", "--dataset", "disc", *TINY, "--no-compare", "--momentum", "0.5"])
    assert "--momentum is for --optimizer sgd" in msg
    argv = ["train", "--dataset", "disc", *TINY, "--no-compare", "--optimizer", "sgd"]
    assert main([*argv, "--momentum", "0.5"]) == 0
    assert "training sgd" in capsys.readouterr().out


def test_plot_path_ending_in_a_dot_is_written_where_the_run_says(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "loss."  # savefig appended ".png" to it
    assert main(["train", "--dataset", "disc", *TINY, "--no-compare", "--plot", str(plot)]) == 0
    assert f"plot     {plot}" in capsys.readouterr().out
    assert plot.read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "loss.png").exists()


@pytest.mark.parametrize(
    "x, y, expected",
    [
        # the shapes of the file, not of the 80% train split (32 of 40)
        (np.zeros(40), np.arange(40) % 2, "got shape (40,)"),
        (np.zeros((40, 2)), (np.arange(40) % 2)[:, None], "got shape (40, 1)"),
        # inf passed the "integer-valued" test and was reported as a too large class label
        (
            np.zeros((40, 2)),
            np.where(np.arange(40) % 2, np.inf, 0.0),
            "20 NaN or infinite labels",
        ),
        (np.zeros((40, 2)), np.where(np.arange(40) % 2, np.nan, 0.0), "NaN or infinite labels"),
        # numpy casts dates and durations to float32 silently
        (np.zeros((40, 2), "datetime64[s]"), np.arange(40) % 2, "must hold numbers"),
        (np.zeros((40, 2), "timedelta64[s]"), np.arange(40) % 2, "must hold numbers"),
    ],
)
def test_npz_errors_describe_the_file(tmp_path, x, y, expected):
    path = tmp_path / "bad.npz"
    np.savez(path, X=x, y=y)
    msg = _error(["train", "--data", str(path), *TINY, "--no-compare"])
    assert expected in msg and "bad.npz" in msg


def _write_idx_typed(path, array, code, dtype):
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(header + array.astype(dtype).tobytes())


def test_idx_images_other_than_bytes_are_not_divided_by_255(tmp_path):
    # float images already in [0, 1] were divided by 255 as if they were bytes
    _mnist_dir(tmp_path)
    images = np.random.default_rng(1).uniform(0.5, 1.0, (40, 28, 28))
    _write_idx_typed(tmp_path / "train-images-idx3-ubyte", images, 0x0D, ">f4")
    ds = cli_data.load_mnist(str(tmp_path))
    np.testing.assert_allclose(ds.x_train, images.reshape(40, 784).astype(np.float32))
    assert ds.x_test.max() <= 1.0 and ds.x_test.max() > 0.9  # bytes: scaled to [0, 1]


def test_idx_shape_errors_name_the_file(tmp_path):
    _mnist_dir(tmp_path)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros(10 * 784, np.uint8), False)
    msg = _error(["train", "--data-dir", str(tmp_path), *TINY, "--no-compare"])
    assert "t10k-images-idx3-ubyte: the image file must have a sample axis" in msg


@pytest.fixture
def bench_must_not_run(monkeypatch):
    """``fusedmlp bench``'s first measurement raises: an error must come before it."""
    from fusedmlp.cli import _bench_engine

    def ran(*args, **kwargs):
        raise AssertionError("the benchmark ran before the options were checked")

    monkeypatch.setattr(_bench_engine, "measure_ceilings", ran)


@pytest.mark.parametrize(
    "option, value", [("--threads", "0"), ("--threads", "-2"), ("--time-budget", "-1"),
                      ("--time-budget", "nan")]
)  # fmt: skip
def test_bench_bad_numbers_are_argparse_errors(option, value, bench_must_not_run, capsys):
    # --threads 0 was ignored, a negative budget skipped every case, a NaN one was ignored
    with pytest.raises(SystemExit) as info:
        main(["bench", "--quick", option, value])
    assert info.value.code == 2
    assert option in capsys.readouterr().err


def test_bench_refuses_bad_outputs_before_running(tmp_path, bench_must_not_run):
    # a folder as --json/--markdown, an unknown --plot format: a traceback after the whole run;
    # --ops "": a run of no rows
    for argv, expected in (
        (["--markdown", str(tmp_path)], "cannot write --markdown"),
        (["--json", str(tmp_path) + "/"], "cannot write --json"),
        (["--plot", str(tmp_path / "p.xyz")], "unknown format 'xyz'"),
        (["--ops", ""], "--ops names no op"),
    ):
        msg = _error(["bench", "--quick", *argv])
        assert msg.startswith("fusedmlp bench:") and expected in msg
    pytest.importorskip("matplotlib")
    assert "cannot write --plot" in _error(["bench", "--quick", "--plot", str(tmp_path)])


def test_bench_plot_without_matplotlib_is_refused_before_running(
    tmp_path, bench_must_not_run, monkeypatch
):
    # it was reported after the whole run, its rows only printed
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # its import (and find_spec) now fail
    msg = _error(["bench", "--quick", "--plot", str(tmp_path / "roofline.png")])
    assert "needs matplotlib" in msg and not (tmp_path / "roofline.png").exists()


def test_verify_refuses_a_bad_json_path_and_seed_before_running(tmp_path, monkeypatch, capsys):
    from fusedmlp.cli import verify

    def ran(*args, **kwargs):
        raise AssertionError("verify ran before the options were checked")

    monkeypatch.setattr(verify, "_run_cases", ran)
    # a folder as --json: an IsADirectoryError traceback after every case had run
    assert main(["verify", "--ops", "sgd", "--dtypes", "fp32", "--json", str(tmp_path)]) == 2
    assert "cannot write" in capsys.readouterr().err
    # beyond torch's seed range: a ValueError traceback from the generator
    with pytest.raises(SystemExit) as info:
        main(["verify", "--ops", "sgd", "--seed", str(2**64)])
    assert info.value.code == 2 and "--seed" in capsys.readouterr().err
