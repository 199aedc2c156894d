"""The compiled splitvl extension in this process, and how a typed wrapper binds to it.

`STATE` is decided once, on import: the extension is built (or loaded from its
cache) by `ops.build`, or, when that fails or `SPLITVL_REFERENCE_OPS=1` is set,
the references are used and one warning names the cause.

`OpTable.op(references)` is the one place an op's wrapper is declared: it
records the wrapper under its function name, gives it the signature and
docstring of `references.<name>` (the pure-torch reference, where the typed
signature, the defaults and the semantics are written once), registers the fake
kernel of `splitvl::<name>`, and, without the extension, hands back the
reference in its place.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import torch

Wrapper = TypeVar("Wrapper", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class ExtensionState:
    available: bool
    reason: str | None  # why the references are used, when they are


def load_state() -> ExtensionState:
    """Build or load the extension; on failure warn once and report why."""
    if os.environ.get("SPLITVL_REFERENCE_OPS", "") not in ("", "0"):
        return ExtensionState(False, "SPLITVL_REFERENCE_OPS is set")
    from ops.build import load_extension

    try:
        load_extension()
    except Exception as exc:  # any build/load failure falls back to the references
        reason = f"{type(exc).__name__}: {exc}"
        short = reason if len(reason) < 3000 else reason[:1000] + "\n...\n" + reason[-2000:]
        warnings.warn(
            f"splitvl ops extension unavailable, using pure-torch references ({short})",
            RuntimeWarning,
            stacklevel=3,
        )
        return ExtensionState(False, reason)
    return ExtensionState(True, None)


STATE = load_state()


def extension_available() -> bool:
    """True when the wrappers run the compiled kernels."""
    return STATE.available


def fallback_reason() -> str | None:
    """Why the references are in use (None when the extension is loaded)."""
    return STATE.reason


@dataclass(frozen=True, slots=True)
class BoundOp:
    """One op of the Python layer: its wrapper and the reference it falls back to."""

    name: str
    wrapper: Callable[..., Any]
    reference: Callable[..., Any]


def _take_signature(wrapper: Callable[..., Any], reference: Callable[..., Any]) -> None:
    """Give `wrapper` the defaults, annotations and docstring of `reference`.

    The wrapper is written with the reference's parameter names only, so the two
    cannot drift apart; help(), inspect.signature() and the binding of omitted
    arguments (by Python and by torch.compile) then see the reference's signature.
    """
    name = reference.__name__
    expected = [(p.name, p.kind) for p in inspect.signature(reference).parameters.values()]
    written = [(p.name, p.kind) for p in inspect.signature(wrapper).parameters.values()]
    if written != expected:
        raise TypeError(
            f"splitvl op {name!r}: the wrapper takes {[n for n, _ in written]}, "
            f"its reference {[n for n, _ in expected]}"
        )
    restated = [
        what
        for what, value in (
            ("defaults", wrapper.__defaults__ or wrapper.__kwdefaults__),
            ("annotations", wrapper.__annotations__),
            ("a docstring", wrapper.__doc__),
        )
        if value
    ]
    if restated:
        raise TypeError(
            f"splitvl op {name!r}: the wrapper restates {', '.join(restated)}; "
            "they are written once, in the reference"
        )
    wrapper.__defaults__ = reference.__defaults__
    wrapper.__kwdefaults__ = dict(reference.__kwdefaults__) if reference.__kwdefaults__ else None
    wrapper.__annotations__ = dict(reference.__annotations__)
    wrapper.__doc__ = reference.__doc__


def _writes_in_place(*args: Any, **kwargs: Any) -> None:
    """The fake kernel of every splitvl op: each writes only into tensors it is given."""
    return None


class OpTable:
    """The typed wrappers of `torch.ops.splitvl`, each declared once with `@table.op(...)`."""

    def __init__(self, state: ExtensionState) -> None:
        self._state = state
        self._ops: dict[str, BoundOp] = {}

    def op(self, references: ModuleType) -> Callable[[Wrapper], Wrapper]:
        """Decorator for the wrapper of `splitvl::<its function name>`.

        The wrapper takes the reference's parameters by bare name (no defaults,
        annotations or docstring) and only allocates the outputs and calls the op.

        Args:
            references: the module holding the op's pure-torch reference under the
                same name.
        Returns:
            A decorator giving the wrapper, with the reference's signature and
            docstring, when the extension is loaded, else the reference.
        Raises:
            TypeError: the wrapper's parameters differ from the reference's, or it
                restates their defaults, annotations or the docstring.
        """

        def bind(wrapper: Wrapper) -> Wrapper:
            name = wrapper.__name__
            if name in self._ops:
                raise ValueError(f"splitvl op {name!r} is declared twice")
            reference = getattr(references, name)
            _take_signature(wrapper, reference)
            self._ops[name] = BoundOp(name, wrapper, reference)
            if not self._state.available:
                return self._ops[name].reference  # type: ignore[return-value]
            torch.library.register_fake(f"splitvl::{name}")(_writes_in_place)
            return wrapper

        return bind

    def ops(self) -> tuple[BoundOp, ...]:
        """Every declared op, in declaration order."""
        return tuple(self._ops.values())
