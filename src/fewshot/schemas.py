"""Config schemas generated from constructor signatures: a constructor is the one home of its defaults.

Every Algorithm subclass in a module of fewshot.algorithms is found and registered as `schema_algo_<module>`
(e.g. conf/algo/maml.yaml starts from `/schema_algo_maml`), every backbone class in a module of fewshot.models
as `schema_backbone_<class name, lower case>`, every loader marked @task_source in fewshot.data as
`schema_dataset_<name>`: the YAML names its choice and sets only what differs from the
constructor's defaults, and a misspelled key fails at compose time, since the schema is a typed dataclass.
Adding an algorithm is one module and one YAML file; nothing is registered by hand.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import typing
from typing import Any, Iterator, Optional

from omegaconf import MISSING

# Constructor arguments the engine supplies itself, per kind: never settings.
SUPPLIED = {
    "algo": {"backbone", "ways"},
    "backbone": {"in_channels", "image_size", "out_features"},  # bound from the dataset and the algorithm
    "optim": {"params"},
    "schedule": {"optimizer", "last_epoch", "verbose"},
    "dataset": set(),
}
# What OmegaConf can type-check; anything else is kept as Any.
PLAIN = (int, float, bool, str)


def _field_type(hint: Any) -> Any:
    if hint in PLAIN:
        return hint
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and len(args) == 2 and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return Optional[inner] if inner in PLAIN else Any
    return Any


def schema_for(target: Any, name: str, kind: str, partial: bool = False) -> type:
    """A dataclass with `_target_`, `name` and one typed field per constructor argument, defaulting as it does."""
    function = target if inspect.isfunction(target) else target.__init__
    hints = typing.get_type_hints(function)
    fields: list[tuple] = [
        ("_target_", str, dataclasses.field(default=f"{target.__module__}.{target.__qualname__}")),
        ("name", str, dataclasses.field(default=MISSING)),
    ]
    if partial:
        fields.append(("_partial_", bool, dataclasses.field(default=True)))
    for param in inspect.signature(function).parameters.values():
        if param.name in SUPPLIED[kind] | {"self"} or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        field_type = _field_type(hints.get(param.name, Any))
        default = MISSING if param.default is param.empty else param.default
        if isinstance(default, (list, tuple, dict)):
            fields.append((param.name, Any, dataclasses.field(default_factory=lambda d=default: list(d))))
        else:
            fields.append((param.name, field_type, dataclasses.field(default=default)))
    # MAMLSchema, LoadOmniglotSchema: the class in error messages (Key 'inner_lrr' not in 'MAMLSchema').
    title = target.__name__ if inspect.isclass(target) else target.__name__.title().replace("_", "")
    return dataclasses.make_dataclass(f"{title}Schema", fields)


def algorithm_schemas() -> Iterator[tuple[str, type]]:
    """(module name, schema) for every Algorithm subclass defined in a module of fewshot.algorithms."""
    import fewshot.algorithms as package
    from fewshot.algorithms.base import Algorithm

    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, Algorithm)
                and obj is not Algorithm
                and obj.__module__ == module.__name__
            ):
                yield info.name, schema_for(obj, info.name, "algo")


def backbone_schemas() -> Iterator[tuple[str, type]]:
    """(class name in lower case, schema) for every public nn.Module class defined in a module of fewshot.models
    (backbones.py, koch.py, ...)."""
    from torch import nn

    import fewshot.models as package

    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, nn.Module)
                and obj.__module__ == module.__name__
                and not obj.__name__.startswith("_")
            ):
                yield obj.__name__.lower(), schema_for(obj, obj.__name__.lower(), "backbone", partial=True)


def torch_schemas() -> Iterator[tuple[str, str, type]]:
    """(group, choice, schema) for the meta-optimizers (optim/) and learning-rate schedules (schedule/) that
    conf/ offers: torch's own classes, their defaults theirs. `schedule=constant` builds no scheduler."""
    import torch

    optim = torch.optim
    for name, cls in (("adam", optim.Adam), ("adamw", optim.AdamW), ("rmsprop", optim.RMSprop), ("sgd", optim.SGD)):
        yield "optim", name, schema_for(cls, name, "optim", partial=True)
    lr = torch.optim.lr_scheduler
    for name, cls in (("step", lr.StepLR), ("cosine", lr.CosineAnnealingLR), ("linear", lr.LinearLR)):
        yield "schedule", name, schema_for(cls, name, "schedule", partial=True)
    constant = dataclasses.make_dataclass(
        "ConstantSchedule", [("_target_", Optional[str], None), ("name", str, "constant")]
    )
    yield "schedule", "constant", constant


def dataset_schemas() -> Iterator[tuple[str, type]]:
    """(name, schema) for every loader marked @task_source in a module of fewshot.data: load_omniglot -> omniglot."""
    import fewshot.data as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg:  # data/io: no loaders
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for obj in vars(module).values():
            if inspect.isfunction(obj) and getattr(obj, "task_source", False) and obj.__module__ == module.__name__:
                name = obj.__name__.removeprefix("load_")
                yield name, schema_for(obj, name, "dataset")
