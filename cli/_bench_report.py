"""Reports of ``fusedmlp bench``: the JSON document, markdown tables, the roofline plot.

The JSON document is ``{"meta": {...}, "ceilings": {...}, "rows": [...]}``; every row has
``op, pass, shape, dtype, impl, ms, gbps, tflops, pct_of_peak, peak_mem_mb, device`` plus
``backend, pct_bw, pct_flops, speedup_vs_torch, speedup_vs_compile, timing, setup_s, bytes,
flops, note, error, skipped``. ``benchmarks/results_md.py`` renders a saved document again.
"""

from __future__ import annotations

import json
import os
import stat

from ._bench_ops import OP_TITLES, OPS

ROW_KEYS = (
    "op",
    "pass",
    "shape",
    "dtype",
    "impl",
    "ms",
    "gbps",
    "tflops",
    "pct_of_peak",
    "peak_mem_mb",
    "device",
)


def document(meta: dict, ceilings: dict, rows: list[dict], complete: bool) -> dict:
    """The JSON document of a run, with the configurations the autotuner chose in it (a row
    slower than its neighbours' runs is read beside the configuration that timed it)."""
    return {
        "meta": {**meta, "complete": complete},
        "ceilings": ceilings,
        "rows": rows,
        "tuned": tuned_configs(),
    }


def tuned_configs() -> list:
    """Every configuration ``fusedmlp.kernels.launch`` tuned in this process: kernel name, the
    autotune key's values, the dtypes of the tensor arguments (also part of the key: bf16 and
    fp32 launches of one shape are tuned apart), the chosen block sizes and launch options
    (none on CPU)."""
    from ..kernels import launch

    out = []
    for (tuner, values, dtypes), (kwargs, options) in launch._BEST.items():
        fn = getattr(tuner, "base_fn", None) or getattr(tuner, "fn", None)
        out.append(
            dict(
                kernel=getattr(fn, "__name__", "?"),
                key=[str(v) for v in values],
                dtypes=sorted({str(d).removeprefix("torch.") for d in dtypes}),
                config=dict(kwargs),
                options=dict(options),
            )
        )
    return sorted(out, key=lambda t: (t["kernel"], t["key"], t["dtypes"]))


def is_special_file(path: str) -> bool:
    """Whether ``path`` names an existing file that is not a regular one (a pipe, a terminal,
    ``/dev/null``), following links as ``open`` does."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def write_json(path: str, doc: dict) -> None:
    """Write ``doc`` whole: to a temporary file renamed over the file ``path`` names (through a
    symbolic link: the file it points to, not the link). Something at ``path`` that is not a
    regular file (``/dev/null``, a FIFO) is written to directly: a rename would replace it."""
    text = json.dumps(doc, indent=1)
    if is_special_file(path):  # os.stat follows /dev/stdout -> /proc/self/fd/1 -> pipe:[...]
        with open(path, "w") as f:  # ``path`` itself: realpath of a pipe's link names nothing
            f.write(text)
        return
    target = os.path.realpath(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, target)


def _num(v, fmt="{:.3g}") -> str:
    return "" if v is None else fmt.format(v)


def _x(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def crossover(rows: list[dict]) -> str | None:
    """Where fusedmlp starts beating eager torch on the small-MLP sweep (wall time per call)."""
    small = [r for r in rows if r["op"] == "mlp_small" and r.get("ms")]
    by_shape: dict = {}
    for r in small:
        by_shape.setdefault(r["shape"], {})[r["impl"]] = r["ms"]
    points = []
    for shape, impls in by_shape.items():
        if "fusedmlp" in impls and "torch" in impls:
            batch = int(shape.split("B=")[1])
            points.append((batch, impls["torch"] / impls["fusedmlp"], shape.split(" ")[0]))
    if not points:
        return None
    points.sort()
    width = points[0][2]
    listing = ", ".join(f"B={b}: {s:.2f}x" for b, s, _ in points)
    wins = [s > 1 for _, s, _ in points]
    if all(wins):
        verdict = (
            f"fusedmlp is faster than eager torch at every batch size tried (from B={points[0][0]})"
        )
    elif not any(wins):
        verdict = "fusedmlp is not faster than eager torch at any batch size tried"
    else:
        first = next(i for i in range(len(points)) if all(wins[i:])) if wins[-1] else None
        if first is None:
            verdict = "fusedmlp does not stay ahead of eager torch up to the largest batch tried"
        else:
            verdict = (
                f"crossover: fusedmlp is faster than eager torch from B={points[first][0]} "
                f"(slower below B={points[first][0]}, where launch overhead dominates)"
            )
    return f"{verdict}. Speedup over eager, wall time per step, {width}: {listing}."


HEADER = (
    "| pass | shape | dtype | impl | backend | ms | GB/s | % copy BW | TFLOPS | % matmul "
    "| % roofline | vs eager | vs compile | peak MB |"
)


def render_markdown(doc: dict, title: str | None = None) -> str:
    meta, ceil, rows = doc["meta"], doc["ceilings"], doc["rows"]
    cpu = meta.get("device_type") == "cpu"
    out = [f"# {title or 'fusedmlp bench'}", ""]
    out.append(f"- device: {meta.get('device')}" + (" (CPU run)" if cpu else ""))
    if meta.get("driver"):
        out.append(f"- driver: {meta['driver']}")
    out.append(f"- date: {meta.get('date')}")
    out.append(
        f"- versions: fusedmlp {meta.get('fusedmlp')}, torch {meta.get('torch')}, "
        f"triton {meta.get('triton')}, python {meta.get('python')}"
    )
    out.append(
        f"- mode: {'quick' if meta.get('quick') else 'full'}; timing: {meta.get('timing')}"
        + ("" if meta.get("complete", True) else "; INCOMPLETE (run interrupted)")
    )
    out.append(
        f"- ceilings measured at the start: {ceil['copy_gbps']:.1f} GB/s ({ceil['copy_what']}), "
        f"{ceil['matmul_tflops']:.3g} TFLOPS ({ceil['matmul_what']})"
    )
    interpreted = cpu and any(
        r["impl"] == "fusedmlp" and r.get("backend") == "triton" for r in rows
    )
    if interpreted:
        out.append(
            "- CPU run: fusedmlp rows run the Triton kernels under Triton's interpreter (backend "
            "`triton`, TRITON_INTERPRET=1): interpreter times, not GPU kernel times"
            + ("." if meta.get("compile") else "; torch.compile baselines skipped.")
        )
    elif cpu:
        out.append(
            "- CPU run: fusedmlp rows run its pure-torch fallback (backend `fallback`), so they "
            "measure dispatch overhead, not Triton kernels"
            + ("." if meta.get("compile") else "; torch.compile baselines skipped.")
        )
    out += [
        "",
        "GB/s from the op's compulsory bytes (formulas in `cli/_bench_ops.py`); "
        "% roofline = max(% copy bandwidth, % matmul peak); vs eager / vs compile = the "
        "baseline's time over this row's time (> 1: this row is faster); peak MB = "
        "`torch.cuda.max_memory_allocated` over one call with the case's tensors live (gradients "
        "reset to None first, as before every timed call), minus what was allocated before the "
        "case.",
        "",
    ]
    for op in OPS:
        op_rows = [r for r in rows if r["op"] == op]
        if not op_rows:
            continue
        out += [f"## {OP_TITLES[op]}", "", HEADER, "|" + "---|" * 14]
        for r in op_rows:
            if r.get("ms") is None:
                why = r.get("error") or f"skipped: {r.get('skipped')}"
                why = why.replace("|", "\\|")
                cells = [r["pass"], r["shape"], r["dtype"], r["impl"], r.get("backend") or ""]
                out.append("| " + " | ".join(cells) + f" | {why} |" + " |" * 8)
                continue
            cells = [
                r["pass"],
                r["shape"],
                r["dtype"],
                r["impl"],
                r.get("backend") or "",
                _num(r["ms"], "{:.4g}"),
                _num(r.get("gbps"), "{:.1f}"),
                _num(r.get("pct_bw"), "{:.1f}"),
                _num(r.get("tflops"), "{:.3g}"),
                _num(r.get("pct_flops"), "{:.1f}"),
                _num(r.get("pct_of_peak"), "{:.1f}"),
                _x(r.get("speedup_vs_torch")),
                _x(r.get("speedup_vs_compile")),
                _num(r.get("peak_mem_mb"), "{:.0f}"),
            ]
            out.append("| " + " | ".join(cells) + " |")
        notes = {}
        for r in op_rows:
            if r.get("note"):
                notes.setdefault(f"{r['impl']}: {r['note']}", None)
        if notes:
            out += [""] + [f"- {n}" for n in notes]
        if op == "mlp_small":
            text = crossover(rows)
            if text and interpreted:
                text = "CPU run, Triton's interpreter against eager: " + text
            elif text and cpu:
                text = "CPU run, fallback against eager (no kernels involved): " + text
            if text:
                out += ["", text]
        out.append("")
    errors = [r for r in rows if r.get("error")]
    skipped = [r for r in rows if r.get("skipped")]
    out.append(f"{len(rows)} rows, {len(errors)} errors, {len(skipped)} skipped.")
    return "\n".join(out) + "\n"


def write_markdown(path: str, doc: dict, title: str | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(render_markdown(doc, title))


def write_plot(path: str, doc: dict) -> None:
    """A horizontal bar chart of percent of roofline per (op, pass, shape) and implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r.get("pct_of_peak") is not None]
    groups: list = []
    for r in rows:
        g = (r["op"], r["pass"], r["shape"], r["dtype"])
        if g not in groups:
            groups.append(g)
    impls = [i for i in ("fusedmlp", "torch", "torch.fused", "torch.compile")]
    impls += sorted({r["impl"] for r in rows} - set(impls))
    impls = [i for i in impls if any(r["impl"] == i for r in rows)]
    height = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.45 * max(1, len(groups))))
    value = {
        ((r["op"], r["pass"], r["shape"], r["dtype"]), r["impl"]): r["pct_of_peak"] for r in rows
    }
    for j, impl in enumerate(impls):
        ys, xs = [], []
        for i, g in enumerate(groups):
            if (g, impl) in value:
                ys.append(i + (j - (len(impls) - 1) / 2) * height)
                xs.append(value[(g, impl)])
        ax.barh(ys, xs, height=height, label=impl)
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels([f"{op} {p} {shape} {dt}" for op, p, shape, dt in groups], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% of roofline (max of % copy bandwidth, % matmul peak)")
    meta = doc["meta"]
    ax.set_title(f"fusedmlp bench on {meta.get('device')}", fontsize=9)
    if impls:
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from ._checks import plot_format

    fig.savefig(path, dpi=110, format=plot_format(path))  # no extension: PNG at exactly path
    plt.close(fig)
