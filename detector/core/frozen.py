"""Cheap construction of frozen, slotted dataclasses (the core's records).

A frozen dataclass's generated ``__init__`` sets every field with ``object.__setattr__`` (its own
``__setattr__`` raises): a method lookup and a generic attribute store per field, about 0.1-0.2 us
each on this project's machines. The records are built several times per request (a request, its
enrichment, its counts, the rule hits, the model result and the decision with 18 fields), which
made ``__init__`` about 8% of replay's time.

:func:`fast_new` replaces that ``__init__`` with a ``__new__`` of the same signature that fills a
plain slotted twin of the class (the same ``__slots__``, so the same memory layout) with ordinary
attribute stores, then sets the instance's ``__class__`` to the record class: 4-5x cheaper. The
result is an ordinary instance of the record class: still frozen (assignment raises
``FrozenInstanceError``), the same ``==``, ``hash``, ``repr``, ``dataclasses.fields``/``replace``/
``asdict``, ``copy``/``pickle`` (``__getnewargs__``) and orjson output.

>>> from dataclasses import FrozenInstanceError, dataclass, field, replace
>>> @fast_new
... @dataclass(frozen=True, slots=True)
... class P:
...     x: int
...     tags: tuple[str, ...] = ()
...     extra: list[int] = field(default_factory=list)
>>> p = P(1)
>>> p, p == P(x=1), replace(p, x=2)
(P(x=1, tags=(), extra=[]), True, P(x=2, tags=(), extra=[]))
>>> try:
...     p.x = 5
... except FrozenInstanceError:
...     print("frozen")
frozen
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, TypeVar, cast

T = TypeVar("T")


def fast_new(cls: type[T]) -> type[T]:
    """Give the frozen slotted dataclass ``cls`` the cheap constructor described above.

    Apply it on top of ``@dataclass(frozen=True, slots=True)`` (type checkers keep seeing the
    dataclass). The class must not be subclassed (a subclass with other slots has another layout)."""
    slots = cls.__dict__.get("__slots__")
    params = getattr(cls, "__dataclass_params__", None)
    if slots is None or params is None or not params.frozen:
        raise TypeError(f"{cls.__name__}: fast_new is for frozen, slotted dataclasses")
    twin = type(f"_{cls.__name__}Builder", (), {"__slots__": slots})
    env: dict[str, Any] = {"_new": object.__new__, "_twin": twin, "_FACTORY": _Factory}
    args, body = [], []
    record_fields = fields(cast(Any, cls))
    for f in record_fields:
        if not f.init or f.kw_only:
            raise TypeError(f"{cls.__name__}.{f.name}: fast_new supports plain positional fields")
        if f.default is not MISSING:
            env[f"_d_{f.name}"] = f.default
            args.append(f"{f.name}=_d_{f.name}")
        elif f.default_factory is not MISSING:
            env[f"_f_{f.name}"] = f.default_factory
            args.append(f"{f.name}=_FACTORY")
            body.append(f"    if {f.name} is _FACTORY:\n        {f.name} = _f_{f.name}()")
        else:
            args.append(f.name)
        body.append(f"    self.{f.name} = {f.name}")
    names = [f.name for f in record_fields]
    src = (
        f"def __new__(cls, {', '.join(args)}):\n"
        "    self = _new(_twin)\n"
        + "\n".join(body) + "\n"
        "    self.__class__ = cls\n"
        "    return self\n"
        "def __getnewargs__(self):\n"
        f"    return ({''.join(f'self.{n}, ' for n in names)})\n"
    )
    # Generated source, as dataclasses itself builds __init__: the only way to get a
    # per-class signature (defaults, keyword calls, errors for missing fields) without a
    # per-call *args/**kwargs loop. Every name in it comes from the class's own fields.
    exec(src, env)  # noqa: S102
    new, getnewargs = env["__new__"], env["__getnewargs__"]
    new.__qualname__ = f"{cls.__qualname__}.__new__"
    getnewargs.__qualname__ = f"{cls.__qualname__}.__getnewargs__"
    type.__setattr__(cls, "__new__", staticmethod(new))
    type.__setattr__(cls, "__getnewargs__", getnewargs)
    type.__delattr__(cls, "__init__")  # object.__init__ then accepts __new__'s arguments
    return cls


class _Factory:
    """Marks a defaulted field whose default comes from its ``default_factory``."""
