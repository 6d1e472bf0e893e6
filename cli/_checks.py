"""Checks shared by the commands: argparse types with a range, and output paths tested before
a long run (not after it, when the work would be lost to a traceback)."""

from __future__ import annotations

import argparse
import importlib.util
import os


def checked_type(convert, ok, expected: str):
    """An argparse type: ``convert(text)`` where ``ok`` holds for it, else argparse's error
    (exit 2) saying ``expected``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


# Widths and thread counts reach torch as C ints: beyond them torch raises a TypeError
# ("Overflow when unpacking long long"), a traceback rather than an argument error.
positive_c_int = checked_type(int, lambda v: 0 < v < 2**31, "a positive integer below 2**31")


def output_path_problem(path: str, make_folder: bool = False) -> str | None:
    """Why the file ``path`` cannot be written, or None when it can (opened for appending, and
    removed again if it was not there). ``make_folder``: a missing folder is made now, as the
    writer would make it later."""
    if not path:
        return "no file name given"
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        return "it is a folder; give a file name"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        if not make_folder:
            return f"no folder {folder}"
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            return f"cannot make the folder {folder}: {e.strerror or e}"
    if not os.access(folder, os.W_OK):
        return f"folder {folder} is not writable"
    existed = os.path.exists(path)
    try:  # what only opening it tells (a read-only file, /proc, a full disk's quota...)
        with open(path, "ab"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    if not existed:  # what open() made: through a dangling link, its target, not the link
        os.remove(os.path.realpath(path))
    return None


MATPLOTLIB_HINT = "pip install matplotlib (or 'fusedmlp[examples]')"


def plot_format_problem(path: str) -> str | None:
    """Why matplotlib cannot save a figure at ``path`` (not installed, or an extension it has no
    format for), or None. An empty extension means PNG."""
    if importlib.util.find_spec("matplotlib") is None:
        return f"it needs matplotlib: {MATPLOTLIB_HINT}"
    from matplotlib.backend_bases import FigureCanvasBase

    ext = os.path.splitext(path)[1][1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext and ext not in formats:
        return f"unknown format {ext!r} ({', '.join(sorted(formats))})"
    return None


def plot_format(path: str) -> str:
    """The format to pass to ``savefig`` for ``path``: its extension, or PNG without one
    (``savefig`` would otherwise append ".png" to "loss" or "loss.", and the plot would not be
    where the command says it is)."""
    return os.path.splitext(path)[1][1:].lower() or "png"
