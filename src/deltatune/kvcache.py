"""The key/value cache argument of transformers models, under both of its names.

transformers 5.25 renamed the forward/generate argument ``past_key_values`` to ``cache`` (and the output field of the
same name); the old name stays a deprecated alias until 5.40. Code that reads or writes a model's cache goes through
this module, which looks at each model class's ``forward`` signature once and uses the name that class takes, so no
deprecation warning is printed and neither generation is treated as the other (a decode step whose cache arrives
under the name we did not read would look like a prefill).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

from .errors import ConfigError

CACHE_NAMES = ("cache", "past_key_values")  # new name first


@functools.cache
def _declared(forward_owner: type) -> str | None:
    """The cache keyword named in ``forward_owner.forward``'s signature, or None."""
    params = inspect.signature(forward_owner.forward).parameters
    return next((name for name in CACHE_NAMES if name in params), None)


def _takes_var_kwargs(module: nn.Module) -> bool:
    params = inspect.signature(type(module).forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def cache_arg(root: nn.Module) -> str | None:
    """The keyword under which ``root`` takes a KV cache: ``"cache"``, ``"past_key_values"`` or None (takes none).

    A task model without the argument in its own signature (``BertForSequenceClassification``) still takes it when its
    ``forward`` passes ``**kwargs`` on to a backbone (``root.<base_model_prefix>``) that names it.
    """
    name = _declared(type(root))
    if name is not None:
        return name
    backbone = getattr(root, getattr(root, "base_model_prefix", "") or "_", None)
    if isinstance(backbone, nn.Module) and backbone is not root and _takes_var_kwargs(root):
        return _declared(type(backbone))
    return None


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the cache from a call's keyword arguments, whichever name it came under, and return it (or None)."""
    given = {name: kwargs.pop(name) for name in CACHE_NAMES if name in kwargs}
    values = [v for v in given.values() if v is not None]
    if len(values) > 1 and values[0] is not values[1]:
        raise ConfigError("both cache= and past_key_values= were given; pass the KV cache under one name")
    return values[0] if values else None


def put_cache(kwargs: dict[str, Any], root: nn.Module, cache: Any) -> None:
    """Set ``cache`` in a call's keyword arguments under the name ``root`` takes (nothing to do for None)."""
    if cache is None:
        return
    name = cache_arg(root)
    if name is None:
        raise ConfigError(f"{type(root).__name__} takes no KV cache (neither cache nor past_key_values)")
    kwargs[name] = cache


def output_cache(output: Any) -> Any:
    """The KV cache a model returned (``output.cache`` on transformers >= 5.25, else ``output.past_key_values``)."""
    for name in CACHE_NAMES:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None
