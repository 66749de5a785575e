"""Registries by name: a base class whose concrete subclasses enter themselves in the registry it names."""

from __future__ import annotations

from typing import Any, ClassVar


class Registered:
    """Mixin of a registry's base class (which sets `registry`, the dict to fill).

    Every subclass that sets `name` in its own body is entered in `registry` under that name when the class is
    defined; intermediate bases without a name of their own stay out.
    """

    registry: ClassVar[dict[str, type]]
    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls.registry[cls.name] = cls
