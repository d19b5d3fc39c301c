"""OmegaConf resolvers of our own (code we ship, not user data): ``${zoo:base}``, ``${zoo:experts}``,
``${zoo:lora}``, ``${zoo:calib}``, ``${zoo:test}`` return the paths of the offline LM zoo, so
experiment configs can point at it: the zoo shipped in ``data/zoo``, checked against its SHA-256
manifest, or the one at ``$ADAMERGE_ZOO`` (built there on first use). ``${zoo_text:...}`` does the
same for the text zoo, which is built on first use (``~/.cache/adamerge`` or ``$ADAMERGE_ZOO_TEXT``)."""

from __future__ import annotations

from functools import cache, partial

from omegaconf import OmegaConf

BUILDERS = {"zoo": "build_zoo", "zoo_text": "build_text_zoo"}
"""Resolver name -> the ``adamerge.zoo`` function that builds (or reuses) that zoo."""


@cache
def built(kind: str):
    import adamerge.zoo

    return getattr(adamerge.zoo, BUILDERS[kind])()


def zoo_field(kind: str, name: str):
    value = getattr(built(kind), name)
    return {k: str(v) for k, v in value.items()} if isinstance(value, dict) else str(value)


def register_resolvers() -> None:
    for kind in BUILDERS:
        if not OmegaConf.has_resolver(kind):
            OmegaConf.register_new_resolver(kind, partial(zoo_field, kind))
