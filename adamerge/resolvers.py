"""OmegaConf resolvers of our own (code we ship, not user data): ``${zoo:base}``, ``${zoo:experts}``,
``${zoo:lora}``, ``${zoo:calib}``, ``${zoo:test}`` build the offline expert zoo on first use and
return its paths, so experiment configs can point at it."""

from __future__ import annotations

from functools import cache

from omegaconf import OmegaConf


@cache
def zoo():
    from adamerge.zoo import build_zoo

    return build_zoo()


def zoo_field(name: str):
    value = getattr(zoo(), name)
    return {k: str(v) for k, v in value.items()} if isinstance(value, dict) else str(value)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("zoo"):
        OmegaConf.register_new_resolver("zoo", zoo_field)
