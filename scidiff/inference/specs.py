"""Config nodes to spec objects: the two steps every ``_target_`` group shares.

A spec (a sampler, an observation method, guidance, a metric suite) is a frozen
dataclass that checks its own values. A config node names its class with ``_target_``
and gives its settings; :func:`target_class` resolves the class (it must be a subclass
of the group's base) and :func:`settings_of` refuses a setting the class does not have,
both with one line naming the key (``sampler.stepz: not a setting of DDIM ...``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def target_class(target: Any, base: type[T], key: str, example: str) -> type[T]:
    """The class ``target`` (a dotted path) names; ``ValueError`` naming ``<key>._target_`` unless
    it is ``base`` or a subclass of it (``example`` is shown as a valid target)."""
    from hydra.utils import get_object

    try:
        cls = get_object(str(target))
    except Exception:  # noqa: BLE001 - hydra raises several kinds; one line naming the key
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{key}._target_: {target} is not a {base.__name__} (e.g. {example})")
    return cls


def settings_of(cls: type, node: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The keyword arguments of the dataclass ``cls`` from a config node; a key that is not
    one of its fields raises ``<key>.<name>: not a setting of <cls> (its settings: ...)``."""
    known = [f.name for f in dataclasses.fields(cls)]
    for name in node:
        if name not in known:
            raise ValueError(f"{key}.{name}: not a setting of {cls.__name__} (its settings: "
                             f"{', '.join(known) or 'none'})")
    return dict(node)


__all__ = ["settings_of", "target_class"]
