"""The model-family registry: everything that differs between model families, behind one
interface (:class:`sdpo.families.base.ModelFamily`), like :data:`sdpo.losses.LOSSES` for the
objectives.

    family = detect_family(read_configs(source))   # the ONE detection rule, from configs alone
    parts = family.load_parts(source, resolution=512)
    cond = parts.encode_prompts(["a cat"], device)

Adding a family = one module here with a :class:`ModelFamily` subclass, registered in
:data:`FAMILIES`; nothing outside this package learns its name. Importing this package loads no
heavy library.
"""

from __future__ import annotations

from sdpo.families import flux, sd3, sd15, sdxl, sdxl_refiner
from sdpo.families.base import (
    EpsilonObjective,
    ModelConfigs,
    ModelFamily,
    ModelParts,
    ModelSource,
    Objective,
    read_configs,
)

FAMILIES: dict[str, ModelFamily] = {
    f.name: f for f in (sd15.FAMILY, sdxl.FAMILY, sdxl_refiner.FAMILY, sd3.FAMILY, flux.FAMILY)
}

__all__ = [
    "FAMILIES",
    "EpsilonObjective",
    "ModelConfigs",
    "ModelFamily",
    "ModelParts",
    "ModelSource",
    "Objective",
    "check_family",
    "detect_family",
    "get_family",
    "read_configs",
]


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None


def detect_family(configs: ModelConfigs, name: str = "the model") -> ModelFamily:
    """The family whose rule matches ``configs`` (the only place a family is recognised).

    Raises ``ValueError`` when none does (or, a registry bug, more than one)."""
    found = [f for f in FAMILIES.values() if f.matches(configs)]
    if len(found) == 1:
        return found[0]
    components = sorted(k for k in configs.index if not k.startswith("_"))
    if not found:
        raise ValueError(
            f"{name!r} is not a pipeline of a known model family ({configs.index.get('_class_name')}"
            f" with {components}); known: "
            + "; ".join(f"{f.name}: {f.description}" for f in FAMILIES.values())
        )
    raise ValueError(f"{name!r} matches several model families: {[f.name for f in found]}")


def check_family(source: ModelSource, *, flags: dict[str, bool] | None = None) -> ModelFamily:
    """Detect the family of ``source`` from its configs, check the family flags given on the
    command line against it (``{"sdxl": True}`` for ``--sdxl``) and the family's own limits
    (e.g. the prediction type). Reads configs only; raises ``ValueError`` naming the flag."""
    name = source.name_or_path
    configs = read_configs(source)
    try:
        family = detect_family(configs, name)
    except ValueError:
        given = [flag for flag, on in (flags or {}).items() if on]
        if given:
            raise ValueError(
                f"--{given[0]} was given but {name!r} is not a {get_family(given[0]).description} "
                f"pipeline ({configs.index.get('_class_name')}); drop --{given[0]} or fix the model"
            ) from None
        raise
    for flag, on in (flags or {}).items():
        if on and family.flag != flag:
            raise ValueError(
                f"--{flag} was given but {name!r} is a {family.name} pipeline "
                f"({family.description}); drop --{flag}"
            )
    if family.flag and not (flags or {}).get(family.flag):
        raise ValueError(
            f"{name!r} is an {family.name.upper()} pipeline ({family.description}); "
            f"pass --{family.flag}"
        )
    family.check_configs(configs, name)
    return family
