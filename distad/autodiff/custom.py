"""User-defined primitives: a forward of your own with the derivative rule you supply."""

from __future__ import annotations

from collections.abc import Callable

from .engine import Primitive

__all__ = ["custom_vjp", "custom_jvp"]


def custom_vjp(fwd: Callable, vjp: Callable, *, jvp: Callable | None = None,
               name: str | None = None) -> Primitive:
    """A primitive whose forward is `fwd(*arrays)` and whose VJP is `vjp(g, y, *arrays)`.

    `vjp` returns a tuple with one cotangent per input (for a fused or
    numerically special function); `jvp(tangents, y, *arrays)`, if given,
    takes one tangent per input (None for inputs without one) and enables
    forward mode. The rule is called once per backward step and shared among
    the inputs.
    """
    memo: dict = {}

    def vjp_i(i, g, y, *xs):
        key = (id(g), id(y))
        if memo.get("key") != key:
            cts = vjp(g, y, *xs)
            if not isinstance(cts, tuple) or len(cts) != len(xs):
                raise TypeError(f"custom_vjp '{name or fwd.__name__}': the VJP must return a "
                                f"tuple of {len(xs)} cotangents, got {type(cts).__name__}")
            memo.update(key=key, cts=cts, refs=(g, y))  # refs keep ids from being reused
        return memo["cts"][i]

    jvp_i = None
    if jvp is not None:
        def jvp_i(i, t, y, *xs):
            ts = [None] * len(xs)
            ts[i] = t
            return jvp(tuple(ts), y, *xs)

    return Primitive(name or getattr(fwd, "__name__", "custom"), fwd, vjp=vjp_i, jvp=jvp_i)


def custom_jvp(fwd: Callable, jvp: Callable, *, vjp: Callable | None = None,
               name: str | None = None) -> Primitive:
    """A primitive with a user JVP rule (forward mode); pass `vjp` too for reverse mode.

    See `custom_vjp` for the rule signatures. Without a VJP, reverse mode
    through this primitive raises a clear error.
    """

    def no_vjp(g, y, *xs):
        raise NotImplementedError(f"custom_jvp '{name or fwd.__name__}': no VJP rule was given; "
                                  "pass vjp= to differentiate it in reverse mode")

    return custom_vjp(fwd, vjp or no_vjp, jvp=jvp, name=name)
