"""`fusedmlp verify`: the self-test table, its exit status, and its interpreter set-up.

The main test runs it as a user does, in a fresh process WITHOUT ``TRITON_INTERPRET`` in the
environment (on a CPU-only machine): ``verify`` itself must switch the interpreter on before
triton builds fusedmlp's kernels. The other tests call ``run`` in-process with a broken case to
prove that a wrong result or an exception makes it fail.
"""

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ON_GPU

from fusedmlp.cli import verify


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDMLP_BACKEND")}
    return env


def _rows(output: str):
    """The table rows: lines whose result column is PASS, FAIL or ERROR."""
    return [line for line in output.splitlines() if re.search(r"\s(PASS|FAIL|ERROR)(\s|$)", line)]


def test_verify_command_passes_on_this_machine(tmp_path):
    report = tmp_path / "verify.json"
    out = subprocess.run(
        [sys.executable, "-m", "fusedmlp", "verify", "--json", str(report)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=str(tmp_path),
        timeout=300,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    rows = _rows(out.stdout)
    assert rows and all(re.search(r"\sPASS(\s|$)", r) for r in rows), text[-6000:]
    assert not re.search(r"\s(FAIL|ERROR)(\s|$)", out.stdout)
    if not ON_GPU:
        assert "interpreter" in out.stdout
    for column in ("op", "case", "dtype", "max abs err", "max rel err", "tolerance", "result"):
        assert column in out.stdout
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["interpreted"] is (not ON_GPU)
    assert len(data["rows"]) == len(rows)
    ops = {r["op"] for r in data["rows"]}
    assert ops >= {"linear", "cross_entropy", "batch_norm", "dropout", "adam", "adamw", "sgd"}
    assert {r["dtype"] for r in data["rows"]} == {"fp32", "fp16", "bf16"}
    assert all(r["launches"] > 0 for r in data["rows"])


@pytest.mark.skipif(ON_GPU, reason="the compiled-mode guard concerns CPU-only machines")
def test_verify_refuses_kernels_already_compiled_in_process():
    code = (
        "import fusedmlp.kernels.launch\n"  # triton's @jit runs here, without the interpreter
        "from fusedmlp.cli.main import main\n"
        "raise SystemExit(main(['verify', '--ops', 'sgd']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd="/"
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "already imported in compiled mode" in out.stderr
    assert "fresh process" in out.stderr and not out.stdout


def _args(**kw):
    base = dict(
        device=None,
        dtypes="fp32",
        ops="sgd",
        json=None,
        seed=0,
        full=False,
        autotune=False,
        time_budget=None,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_verify_fails_on_a_wrong_result(monkeypatch, capsys):
    original = verify._case_optimizer

    def wrong(*args, **kwargs):
        checks = original(*args, **kwargs)
        checks[0].actual = checks[0].actual.detach() + 1e-2  # a wrong kernel result
        return checks

    monkeypatch.setattr(verify, "_case_optimizer", wrong)
    assert verify.run(_args()) == 1
    out = capsys.readouterr().out
    assert re.search(r"\sFAIL(\s|$)", out) and "out of tolerance" in out
    assert re.search(r"\sPASS(\s|$)", out)  # the other tensors still pass


def test_verify_fails_on_an_op_that_raises(monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(verify, "_case_optimizer", boom)
    assert verify.run(_args()) == 1
    out = capsys.readouterr().out
    assert re.search(r"\sERROR\s", out) and "kernel exploded" in out


def test_verify_fails_when_no_kernel_ran(monkeypatch, capsys):
    import fusedmlp

    original = verify._case_optimizer

    def fallback(*args, **kwargs):
        with fusedmlp.use_backend("torch"):  # the fallback must not pass for the kernel
            return original(*args, **kwargs)

    monkeypatch.setattr(verify, "_case_optimizer", fallback)
    assert verify.run(_args()) == 1
    assert "no Triton kernel launched" in capsys.readouterr().out


def test_verify_rejects_unknown_dtypes_and_ops(capsys):
    assert verify.run(_args(dtypes="fp8")) == 2
    assert verify.run(_args(ops="conv")) == 2
    assert "unknown" in capsys.readouterr().err


def test_verify_time_budget_starts_no_case_after_it(capsys):
    # gpu_check.sh runs verify with --time-budget: a case that starts before the deadline runs
    # whole, the ones after it are counted as not run.
    import time

    ran = []

    def case(name, delay):
        def thunk(inp, dtype):
            ran.append(name)
            time.sleep(delay)
            return []

        return thunk

    cases = [("sgd", "a", "fp32", case("a", 0.2)), ("sgd", "b", "fp32", case("b", 0.0))]
    deadline = time.perf_counter() + 0.1
    rows, not_run = verify._run_cases(cases, ["sgd"], None, True, deadline)
    assert ran == ["a"] and not_run == 1 and rows == []


def test_verify_with_a_spent_time_budget_fails_and_says_so(capsys, tmp_path):
    report = tmp_path / "verify.json"
    assert verify.run(_args(time_budget=0, json=str(report))) == 1  # nothing was verified
    out = capsys.readouterr().out
    assert "INCOMPLETE" in out and "0 checks" in out
    data = json.loads(report.read_text())
    assert data["passed"] is False and data["complete"] is False and data["cases_not_run"] > 0


@pytest.mark.parametrize("budget", [-5.0, float("nan"), float("inf")])
def test_verify_rejects_a_time_budget_that_is_not_a_number_of_seconds(budget, capsys):
    assert verify.run(_args(time_budget=budget)) == 2
    assert "--time-budget" in capsys.readouterr().err


def test_verify_rejects_a_bad_device_and_a_json_path_without_folder(tmp_path, capsys):
    # said on stderr: stdout carries the report
    for device in ("foo", ""):  # '' is not the default device (torch.device('') refuses it)
        assert verify.run(_args(device=device)) == 2
        out = capsys.readouterr()
        assert f"bad --device {device!r}" in out.err and not out.out
    report = tmp_path / "no" / "such" / "verify.json"
    assert verify.run(_args(json=str(report))) == 2  # before any case runs
    out = capsys.readouterr()
    assert "no folder" in out.err and str(report.parent) in out.err and "PASS" not in out.out


def test_verify_refuses_an_op_with_no_case_in_the_dtypes(capsys):
    # mlp_block runs in fp32 only: asked for in 16-bit dtypes it must not pass unverified
    assert verify.run(_args(ops="mlp_block,sgd", dtypes="fp16")) == 2
    assert "mlp_block" in capsys.readouterr().err


def test_verify_dropout2d_fails_when_nothing_is_dropped(monkeypatch, capsys):
    import fusedmlp.kernels.dropout as KD  # the interpreter is on (conftest)

    original = KD.dropout_apply

    def never_drops(x, seed, p, inner=1, backward=False, channel=False):
        if inner > 1:  # channel-wise: keep every channel
            return original(x, seed, 0.0, inner, backward, channel) / (1 - p)
        return original(x, seed, p, inner, backward, channel)

    monkeypatch.setattr(KD, "dropout_apply", never_drops)
    assert verify.run(_args(ops="dropout")) == 1
    rows = [line for line in capsys.readouterr().out.splitlines() if "channel keep rate" in line]
    assert rows and any("FAIL" in line for line in rows), rows
