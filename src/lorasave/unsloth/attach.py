"""``lorasave.attach(model)``: Unsloth's saving names as methods of a live PeftModel."""

from __future__ import annotations

import copyreg
import functools
from collections.abc import Callable
from typing import Any

from lorasave.errors import UnsupportedModelError
from lorasave.unsloth import calls
from lorasave.unsloth.values import METHODS, NOT_OFFERED, not_offered

_ATTACHED: dict[type, type] = {}


def _attached_class(cls: type) -> type:
    """``cls`` with the six names as methods, Unsloth's other names answered by :class:`NotOfferedError`, pickled as ``cls``."""
    if getattr(cls, "_lorasave_attached", False):
        return cls
    if cls in _ATTACHED:
        return _ATTACHED[cls]
    functions = {name: getattr(calls, name) for name in METHODS}

    def method(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def bound(self: Any, *args: Any, **kwargs: Any) -> Any:
            return fn(self, *args, **kwargs)

        return bound

    def __getattr__(self: Any, name: str) -> Any:
        if name in NOT_OFFERED:
            raise not_offered(name)
        return cls.__getattr__(self, name)  # type: ignore[attr-defined]

    def __reduce_ex__(self: Any, protocol: Any) -> Any:
        reduced = cls.__reduce_ex__(self, protocol)
        if isinstance(reduced, tuple) and len(reduced) > 1 and reduced[1] and reduced[1][0] is sub:  # a pickle (or copy) is of the plain class
            make = cls.__new__ if reduced[0] is copyreg.__newobj__ else reduced[0]  # pickle refuses __newobj__ of another class
            reduced = (make, (cls, *reduced[1][1:]), *reduced[2:])
        return reduced

    namespace: dict[str, Any] = {name: method(fn) for name, fn in functions.items()}
    namespace.update(
        __getattr__=__getattr__,
        __reduce_ex__=__reduce_ex__,
        _lorasave_attached=True,
        __module__=cls.__module__,
        __qualname__=cls.__qualname__,
        __doc__=cls.__doc__,
    )
    sub = type(cls.__name__, (cls,), namespace)
    _ATTACHED[cls] = sub
    return sub


def attach(model: Any) -> Any:
    """Give a live ``peft.PeftModel`` Unsloth's saving methods, written by lorasave; returns the model.

    Binds :data:`METHODS` (``model.save_pretrained_merged(...)``, ``push_to_hub_merged``,
    ``save_pretrained_gguf``, ``push_to_hub_gguf``, ``save_pretrained_ggml``, ``push_to_hub_ggml``: this
    module's functions), replacing Unsloth's when the model has them, and makes Unsloth's names lorasave
    does not offer (:data:`NOT_OFFERED`) raise a :class:`NotOfferedError` (an AttributeError) saying what
    to use instead. The model's class becomes a subclass of its class carrying these methods (same name,
    ``isinstance`` unchanged; pickles and copies are of the original class); nothing else changes.

    Raises:
        UnsupportedModelError: ``model`` is not a ``peft.PeftModel``.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise UnsupportedModelError(
            f"lorasave.attach needs a peft.PeftModel (the base with its LoRA adapter, e.g. from get_peft_model), got {type(model).__name__}"
        )
    for name in (*METHODS, *NOT_OFFERED):
        vars(model).pop(name, None)  # Unsloth binds its own on the instance, which would win over the class's
    model.__class__ = _attached_class(type(model))
    return model
