"""The ``FUSEDMLP_*`` tuning switches (README, "Backends"), each read once where it is used.

The kernel modules read theirs at their first import, which is the first Triton-path call: a
value a switch does not know warns and keeps the default there, instead of a traceback in the
middle of a run (``FUSEDMLP_BACKEND``, read by ``import fusedmlp``, raises instead).
"""

from __future__ import annotations

import os
import warnings


def _unknown(name: str, text: str, expected: str, default) -> None:
    warnings.warn(
        f"${name}={text!r} is not {expected}; using the default ({default!r})",
        RuntimeWarning,
        stacklevel=3,
    )


def choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """``$name`` when it is one of ``choices`` (unset or empty: ``default``)."""
    text = os.environ.get(name, "")
    if text == "" or text in choices:
        return text or default
    _unknown(name, text, "one of " + ", ".join(map(repr, choices)), default)
    return default


def switch(name: str) -> bool:
    """An on/off switch, on by default: ``$name=0`` turns it off."""
    return choice(name, ("0", "1"), "1") != "0"


def byte_count(name: str, default: int) -> int:
    """A whole number of bytes >= 0 (unset or empty: ``default``)."""
    text = os.environ.get(name, "").strip()
    if text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        _unknown(name, text, "a whole number of bytes >= 0", default)
        return default
    return value
