"""Training and cleaning methods as tasks (see `base.Task`), registered by name, each with its own Spec.

Heavy regularization is not a class: it is `contrastive` with a weight-decay search space. MMCL-only and SSL-only
cleaning are `contrastive` with one weight at 0.

`MethodSpec` is the union of the registered methods' Specs, told apart by `name` (pydantic's discriminated union): a
`method:` mapping validates against its own method's fields only, so a field of another method is refused instead of
being silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError, WrapValidator
from pydantic_core import ValidationError as CoreValidationError
from torch import nn

from cleansweep.errors import UserError
from cleansweep.methods.base import BaseMethodSpec, Task
from cleansweep.methods.contrastive import Contrastive
from cleansweep.methods.deep_cluster import DeepCluster
from cleansweep.methods.l2_init import L2Init
from cleansweep.methods.perturb_recover import PerturbRecover
from cleansweep.methods.shrink_perturb import ShrinkPerturb

METHODS: dict[str, tuple[type[Task], str]] = {
    "contrastive": (
        Contrastive,
        "mmcl_weight * MMCL + ssl_weight * in-modal SSL: pre-training (MMCL, MMCL+SSL), CleanCLIP, MMCL-/SSL-only, "
        "and heavy regularization (with a weight-decay space)",
    ),
    "deep_cluster": (
        DeepCluster,
        "contrastive + cluster_weight * CE on per-epoch spherical k-means pseudo-labels through a fresh linear head",
    ),
    "l2_init": (L2Init, "contrastive + l2_init_weight * squared L2 distance to the weights at the start of cleaning"),
    "perturb_recover": (
        PerturbRecover,
        "Perturb and Recover: contrastive - par_weight * mean min(1 - cos(f, f0), par_cap) over image and text "
        "embeddings, f0 = the model frozen at the start of cleaning (no trigger knowledge)",
    ),
    "shrink_perturb": (
        ShrinkPerturb,
        "theta <- shrink * theta + perturb * noise (fresh init or N(0, 1)) once before training, then contrastive",
    ),
}
DEFAULT_METHOD = "contrastive"  # a `method:` mapping without `name`


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return list(METHODS)


def spec_class(name: str) -> type[BaseMethodSpec]:
    """The Spec class of method `name`.

    Raises:
        UserError: Unknown method name.
    """
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
    return METHODS[name][0].spec_class


def _foreign_field(name: str, key: str) -> str:
    """One line: `key` is not a field of method `name`; which methods have it, and what `name` takes."""
    owners = [m for m in METHODS if key in spec_class(m).model_fields]
    where = f"a field of {', '.join(owners)}" if owners else "check the spelling"
    own = ", ".join(spec_class(name).model_fields)
    return f"{key}: not a field of method {name!r} ({where}); {name} takes {own}"


def _named(value: Any) -> Any:
    """Name the default method where `name` is left out; refuse an unknown method or a field of another method."""
    if not isinstance(value, dict):
        return value
    name = value.get("name", DEFAULT_METHOD)
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
    foreign = [key for key in value if key not in spec_class(name).model_fields]
    if foreign:
        raise ValueError(_foreign_field(name, str(foreign[0])))
    return {**value, "name": name}


def _untagged(value: Any, handler: Any) -> Any:
    """Errors in a method's fields located at `method.<field>`, without the union's tag (`method.<name>.<field>`)."""
    try:
        return handler(value)
    except ValidationError as err:
        details = []
        for e in err.errors():
            loc = e["loc"][1:] if e["loc"] and e["loc"][0] in METHODS else e["loc"]
            details.append({"type": e["type"], "loc": loc, "input": e["input"], **({"ctx": e["ctx"]} if "ctx" in e
                                                                                    else {})})
        raise CoreValidationError.from_exception_data(err.title, details) from None


# Built from the registry: a method registered above is a valid `method:` of every TrainSpec.
MethodSpec = Annotated[
    Union[tuple(cls.spec_class for cls, _ in METHODS.values())],  # noqa: UP007 - a tuple built at run time
    Field(discriminator="name"), WrapValidator(_untagged), BeforeValidator(_named),
]
_ADAPTER: TypeAdapter[BaseMethodSpec] = TypeAdapter(MethodSpec)


def method_spec(values: dict[str, Any]) -> BaseMethodSpec:
    """Validate a `method:` mapping (`name` picks the method, default contrastive) into that method's Spec.

    Raises:
        UserError: Unknown method, a field the method does not have, or a bad value (one line).
    """
    try:
        return _ADAPTER.validate_python(values)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in ("method", *first["loc"]))
        raise UserError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None


def create_task(spec: BaseMethodSpec, model: nn.Module, *, distributed: bool = False) -> Task:
    """Build the task named by `spec.name` around `model`.

    Args:
        spec: Method name and hyperparameters (that method's Spec, e.g. from `method_spec`).
        model: The CLIP model to train.
        distributed: Gather features across ranks for the contrastive losses.

    Raises:
        UserError: Unknown method name.
    """
    cls = METHODS[spec.name][0] if spec.name in METHODS else spec_class(spec.name)
    if not isinstance(spec, cls.spec_class):
        raise TypeError(f"method {spec.name!r} takes a {cls.spec_class.__name__}, got a {type(spec).__name__}")
    return cls(model, spec, distributed=distributed)


__all__ = ["DEFAULT_METHOD", "METHODS", "MethodSpec", "Task", "create_task", "list_methods", "method_spec",
           "spec_class"]
