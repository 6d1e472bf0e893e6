"""Compile kernel configurations for sm_90 in a process where triton is NOT interpreting.

Under ``TRITON_INTERPRET=1`` the ``tl`` library functions and nested ``@triton.jit`` helpers are
interpreter objects that the real compiler cannot lower, so ``test_sm90_compile.py`` hands the
configurations its run launched to this script (a pickle on stdin) and reads one JSON line per
configuration back.

Input: list of (module, qualname, signature: dict, constexprs: dict, num_warps, num_stages, label,
specialization: dict). ``specialization`` maps each runtime argument to what the JIT would
specialise on (``fusedmlp.kernels.launch.arg_specialization``): ``"1"`` compiles the argument as
the constant 1, ``"D"`` adds ``tt.divisibility = 16``, unless the kernel's ``do_not_specialize``
(``do_not_specialize_on_alignment`` for pointers) lists the parameter: the JIT's own rules, so
that registers and spills are those of the GPU compile.
"""

import importlib
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile

# H100 (sm_90) opt-in shared memory per block.
SM90_MAX_SHARED = 227 * 1024


def resources(cubin: bytes) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True
        )
    for line in out.stdout.splitlines():
        if "REG:" in line:
            return " ".join(line.split())
    return "resources unknown"


def specialize(fn, signature: dict, constexprs: dict, spec: dict):
    """(signature, constexprs, attrs) as triton's JIT would compile the recorded values."""
    signature, constexprs, attrs = dict(signature), dict(constexprs), {}
    params = {p.name: p for p in getattr(fn, "params", [])}
    for i, (name, ty) in enumerate(signature.items()):
        kind, param = spec.get(name, ""), params.get(name)
        if ty == "constexpr" or not kind:
            continue
        pointer = ty.startswith("*")
        if pointer and getattr(param, "do_not_specialize_on_alignment", False):
            continue
        if not pointer and getattr(param, "do_not_specialize", False):
            continue
        if kind == "1" and not pointer:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif kind == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jobs = pickle.load(sys.stdin.buffer)
    print(json.dumps({"triton": triton.__version__, "path": triton.__file__}), flush=True)
    target = GPUTarget("cuda", 90, 32)
    for module, qualname, signature, constexprs, warps, stages, label, spec in jobs:
        result = {"label": label}
        try:
            obj = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            while not hasattr(obj, "arg_names") and hasattr(obj, "fn"):  # autotuner / heuristics
                obj = obj.fn
            if "INTERPRET" in constexprs:  # compile the GPU code, not the interpreter-only branch
                constexprs = {**constexprs, "INTERPRET": False}
            signature, constexprs, attrs = specialize(obj, signature, constexprs, spec)
            src = ASTSource(obj, signature, constexprs, attrs)
            compiled = triton.compile(
                src, target=target, options={"num_warps": warps, "num_stages": stages}
            )
            shared = compiled.metadata.shared
            # fp32 square roots and divisions that are not correctly rounded (tl.sqrt, "/")
            ptx = compiled.asm["ptx"]
            result["approx"] = sorted(
                set(re.findall(r"\b(?:sqrt|div|rcp)\.(?:approx|full)\S*", ptx))
            )
            result["resources"] = f"{resources(compiled.asm['cubin'])} shared={shared}"
            if shared > SM90_MAX_SHARED:
                result["error"] = f"{shared} B shared memory > {SM90_MAX_SHARED} B"
        except Exception as e:  # noqa: BLE001 - reported to the test
            first = str(e).strip().splitlines()
            result["error"] = f"{type(e).__name__}: {first[0] if first else ''}"
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
