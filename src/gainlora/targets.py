"""Objects a config names by ``_target_``, resolved against allow-lists, and the one-line errors.

A config.yaml from someone else's run directory can only name the project's own methods,
``torch.optim`` optimizers, Lightning strategies and loggers: nothing outside those packages is
imported, and no function is called. Arguments are bound to the constructor's signature in
pydantic's strict mode over JSON data, so a method file carries its own constraints as annotations
(``Annotated[float, Field(gt=0, le=1)]``) and a config value is what the user typed.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, create_model

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)
NAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]{0,99}")  # not '-' first: shell tools would read it as an option
MISSING = object()


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the value and what is accepted."""


def show(value: Any) -> str:
    text = "<missing>" if value is MISSING else value if isinstance(value, str) and value.isprintable() \
        else json.dumps(value, default=str)  # control characters escaped: the error stays one line
    return text if len(text) <= 80 else text[:77] + "..."


def refuse(key: str, value: Any, accepted: str) -> ConfigError:
    return ConfigError(f"{key}={show(value)}: {accepted}")


def check_name(key: str, value: Any) -> str:
    """A run id or experiment name: one path component, never a path."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)
    if not (isinstance(value, str) and NAME.fullmatch(value) and value not in (".", "..")):
        raise refuse(key, value, "a name of 1-100 characters from A-Z a-z 0-9 . _ - (not a path, not '.' or '..', "
                                 "not starting with '-')")
    return value


# -- objects named by _target_ ----------------------------------------------------------------------------
@dataclass
class Bound:
    """A class from an allow-list and its validated keyword arguments (nested methods bound too)."""
    cls: type
    kwargs: dict[str, Any]
    label: str | None = None


def method_names() -> list[str]:
    import gainlora.methods as methods

    return sorted(f"gainlora.methods.{n}" for n in methods.__all__ if n != "Method")


def allowed_class(key: str, target: Any, modules: tuple[str, ...], base: type, what: str, known: list[str]) -> type:
    """The class ``target`` names, if it lives under one of ``modules`` and subclasses ``base``;
    nothing outside those modules is ever imported."""
    ok = isinstance(target, str) and any(target.startswith(m + ".") for m in modules)
    if ok:
        module, _, name = target.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            found = None
        ok = (isinstance(found, type) and issubclass(found, base)
              and any(found.__module__ == m or found.__module__.startswith(m + ".") for m in modules))
    if not ok:
        raise refuse(f"{key}._target_", target if isinstance(target, str) else show(target),
                     f"not one of the project's {what} ({', '.join(known)})")
    return found


def bind(key: str, cls: type, spec: dict, *, skip: tuple[str, ...] = ()) -> dict:
    """Validate ``spec`` against ``cls.__init__``'s signature and annotations: unknown keys, types
    and the ranges that ``Annotated[..., Field(...)]`` annotations state are checked."""
    params = inspect.signature(cls).parameters
    hints = _hints(cls)
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    found: dict[str, Any] = {}
    for name, param in params.items():
        if name in skip or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        annotation = hints.get(name, Any)
        try:
            TypeAdapter(annotation, config=STRICT)
        except Exception:  # an annotation pydantic cannot check: any value, the constructor checks it
            annotation = Any
        found[name] = (annotation, ... if param.default is param.empty else param.default)
    model = create_model(f"{cls.__name__}Arguments", __config__=ConfigDict(
        STRICT, extra="allow" if open_ended else "forbid"), **found)
    try:
        valid = model.model_validate_json(json.dumps(spec))
    except ValidationError as err:
        raise from_pydantic(err, spec, key, model) from None
    return {name: getattr(valid, name) for name in spec if name in found} | dict(valid.model_extra or {})


def bind_method(key: str, spec: Any, accepted: tuple[type, ...] = ()) -> Bound:
    """A method section: its class (allow-listed) and validated arguments. A parameter annotated
    with a Method type takes a nested method section: ``Method`` itself, any method (Replay's
    ``method``); a class or a union of classes, exactly those (GainLoRA's ``branches``: a subclass
    such as EPI adds routing or gates that the outer method knows nothing of). ``accepted``: the
    classes this section may name (empty: any method)."""
    from gainlora.methods.base import Method

    if not isinstance(spec, dict):
        raise refuse(key, spec, "a method section with _target_ (conf/method/*.yaml)")
    spec = dict(spec)
    target = spec.pop("_target_", MISSING)
    cls = allowed_class(key, target, ("gainlora.methods",), Method, "methods", method_names())
    if accepted and cls not in accepted:
        raise refuse(f"{key}._target_", target, "one of " + ", ".join(f"{c.__module__.rpartition('.')[0]}.{c.__name__}"
                                                                      for c in accepted))
    label = spec.pop("name", None)
    if label is not None and not isinstance(label, str):
        raise refuse(f"{key}.name", label, "a string label")
    inner = {name: (spec.pop(name), classes) for name, hint in _hints(cls).items() if name in spec
             for classes in [_method_classes(hint, Method)] if classes is not None}
    for name, value in spec.items():
        if isinstance(value, dict) and "_target_" in value:
            raise refuse(f"{key}.{name}", value.get("_target_"), f"{cls.__name__}.{name} takes a plain value")
    # this section's own values first: a nested section copies some of them (GainLoRA's branches take
    # ${method.max_batches}), and method.max_batches=0 is named as typed, not as method.branches.max_batches
    own = bind(key, cls, spec, skip=tuple(inner))
    nested = {name: bind_method(f"{key}.{name}", sub, classes) for name, (sub, classes) in inner.items()}
    kwargs = {**own, **nested}
    # constraints between arguments (L2P: top_n <= pool_size): (argument, accepted) or None
    problem = cls.argument_problem({**_defaults(cls), **kwargs})
    if problem is not None:
        name, accepted = problem
        raise refuse(f"{key}.{name}", kwargs.get(name, _defaults(cls).get(name)), accepted)
    return Bound(cls, kwargs, label)


def _defaults(cls: type) -> dict[str, Any]:
    return {n: p.default for n, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


def _method_classes(hint: Any, base: type) -> tuple[type, ...] | None:
    """For a parameter annotated with method classes, the classes it accepts (() for ``Method``:
    any); None for any other annotation."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if not all(isinstance(m, type) and issubclass(m, base) for m in members):
        return None
    return () if members == (base,) else tuple(members)


def make(bound: Bound):
    """Instantiate a bound class; nested bound arguments first (GainLoRA's branch method)."""
    obj = bound.cls(**{k: make(v) if isinstance(v, Bound) else v for k, v in bound.kwargs.items()})
    if bound.label:
        obj.name = bound.label
    return obj


def check_method(key: str, spec: Any) -> Bound:
    """``bind_method``, then the constructors' own checks of how the arguments combine (what replay
    may wrap): a method is plain Python state, cheap to make, so it is made once here, before
    anything is loaded or written."""
    bound = bind_method(key, spec)
    try:
        make(bound)
    except (ValueError, TypeError) as err:
        raise refuse(f"{key}._target_", spec.get("_target_"), str(err)) from None
    return bound


def _hints(obj: Any) -> dict[str, Any]:
    """Resolved annotations (with their ``Annotated`` constraints) of a class's __init__ or a function."""
    try:
        return typing.get_type_hints(obj.__init__ if isinstance(obj, type) else obj, include_extras=True)
    except (NameError, TypeError):
        return {}


def bind_optimizer(spec: dict) -> Bound:
    spec = dict(spec)
    known = ["torch.optim.AdamW", "torch.optim.Adam", "torch.optim.SGD", "..."]
    cls = allowed_class("optimizer", spec.pop("_target_", MISSING), ("torch.optim",), torch.optim.Optimizer,
                        "optimizers", known)
    partial = spec.pop("_partial_", MISSING)
    if partial is not True:
        raise refuse("optimizer._partial_", partial, "true (the module passes the parameters)")
    kwargs = bind("optimizer", cls, spec, skip=("params",))
    # torch checks these only when the optimizer is made, once training has started
    if not isinstance(kwargs.get("lr", 1.0), (int, float)) or not kwargs.get("lr", 1.0) > 0:
        raise refuse("optimizer.lr", spec.get("lr"), "a number > 0")
    if kwargs.get("weight_decay", 0.0) < 0:
        raise refuse("optimizer.weight_decay", spec["weight_decay"], "a number >= 0")
    probe_optimizer(cls, kwargs)
    return Bound(cls, kwargs)


def probe_optimizer(cls: type, kwargs: dict) -> None:
    """torch's own checks of the arguments (betas, eps, momentum) and of the step (SparseAdam takes
    no dense gradients), on one throwaway parameter instead of after the run directory is written."""
    weight = torch.nn.Parameter(torch.ones(2))
    try:
        optimizer = cls([weight], **kwargs)
        weight.grad = torch.ones(2)
        optimizer.step(lambda: weight.sum())  # a closure, as Lightning passes one (LBFGS needs it)
    except (ValueError, TypeError, RuntimeError) as err:
        message = str(err).splitlines()[0]
        # torch names the argument in its own words ("Invalid beta parameter", "Invalid epsilon value")
        named = next((k for k in kwargs if OPTIMIZER_WORDS.get(k, k) in message.lower()), None)
        if named is None:
            raise refuse("optimizer._target_", f"torch.optim.{cls.__name__}", message) from None
        raise refuse(f"optimizer.{named}", kwargs[named], message) from None


OPTIMIZER_WORDS = {"betas": "beta", "eps": "epsilon", "lr": "learning rate"}


def bind_strategy(spec: dict) -> Bound | str:
    """A Lightning strategy by registry name (``name: auto``) or class (``_target_``) with arguments."""
    from lightning.pytorch.strategies import Strategy, StrategyRegistry

    spec = dict(spec)
    if "_target_" not in spec:
        names = ["auto", *StrategyRegistry.available_strategies()]
        if set(spec) != {"name"} or spec["name"] not in names:
            raise refuse("strategy.name", spec.get("name", MISSING), f"one of {', '.join(names)} (or a _target_)")
        return spec["name"]
    # Another module's Strategy only when the person running opts in through the environment (the
    # CPU DeepSpeed shim of the tests): a config file alone can never widen the allow-list.
    trusted = tuple(m for m in os.environ.get("GAINLORA_TRUSTED_MODULES", "").split(",") if m)
    cls = allowed_class("strategy", spec.pop("_target_"), ("lightning.pytorch.strategies", *trusted), Strategy,
                        "strategies", ["lightning.pytorch.strategies.DDPStrategy", "...DeepSpeedStrategy"])
    return Bound(cls, bind("strategy", cls, spec))


LOGGERS = ("gainlora.csv_logger.RunCSVLogger", "gainlora.wandb_logging.make_wandb_logger")


def bind_logger(name: str, spec: dict) -> Bound:
    """Lightning's loggers or the project's two (the run's metrics.csv, the W&B factory)."""
    from lightning.pytorch.loggers import Logger

    key, spec = f"logger.{name}", dict(spec)
    target = spec.pop("_target_", MISSING)
    spec.pop("_recursive_", None)  # nothing is built recursively: nested values stay plain data
    if target in LOGGERS:
        module, _, attr = target.rpartition(".")
        cls = getattr(importlib.import_module(module), attr)
        if target == LOGGERS[1]:
            kwargs = bind(key, cls, spec)
            importlib.import_module(module).check(key, kwargs)
            return Bound(cls, kwargs)
    else:
        cls = allowed_class(key, target, ("lightning.pytorch.loggers",), Logger, "loggers",
                            [*LOGGERS, "lightning.pytorch.loggers.*"])
    return Bound(cls, bind(key, cls, spec))


def from_pydantic(err: ValidationError, data: Any, prefix: str = "", model: type[BaseModel] | None = None) -> ConfigError:
    """One line for the first offending key: ``key=value: what is accepted``."""
    first = err.errors()[0]
    path, node = [], data
    for part in first["loc"]:  # keep the config keys, drop pydantic's union-member tags
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) \
                and part < len(node):
            path.append(part)
            node = node[part]
        elif first["type"] == "missing" and not isinstance(node, list):
            path.append(part)
            node = MISSING
            break
        else:
            break
    key = ".".join(map(str, filter(lambda p: p != "", [prefix, *path]))) or "config"
    if first["type"] == "value_error":  # a model validator: its message names its own key
        own, _, accepted = first["msg"].removeprefix("Value error, ").partition(": ")
        return ConfigError(f"{own}={show(_lookup(data, own.split('.')))}: {accepted}")
    if first["type"] == "extra_forbidden":
        return ConfigError(f"{key}={show(first['input'])}: unknown key (a typo?)")
    if first["type"] == "missing":
        if isinstance(node, list):  # a fixed-length list that is too short
            return ConfigError(f"{key}={show(node)}: should have more items ({len(node)} given)")
        return ConfigError(f"{key}=<missing>: required")
    # union members of types JSON data can never be (e.g. torch.Tensor in ``lr: float | Tensor``) say nothing
    same = [e for e in err.errors() if tuple(e["loc"][: len(path)]) == tuple(path)
            and e["type"] != "needs_python_object"] or [first]
    wanted = []
    for e in same:
        text = re.sub(r"^(Input|String|List|Tuple|Set|Value|Dictionary) should (be )?", "", e["msg"])
        text = re.sub(r" after validation, not \d+", "", text)
        if text not in wanted:
            wanted.append(text.replace("None", "null").replace("array", "list"))
    if model is not None and path and "null" not in wanted and _accepts_null(model, data, path):
        wanted.append("null")
    value = node if path else first["input"]
    verb = "should " if wanted[0].startswith(("have ", "match ")) else "should be "
    accepted = " or ".join(wanted)
    return ConfigError(f"{key}={show(value)}: {verb}" + (accepted.replace(" or null", " or be null")
                                                         if verb == "should " else accepted))


def _accepts_null(model: type[BaseModel], data: Any, path: list) -> bool:
    """Whether ``null`` at ``path`` would pass (to say so in the message)."""
    copy = json.loads(json.dumps(data, default=str))
    target = copy
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = None
    try:
        model.model_validate_json(json.dumps(copy))
    except ValidationError as err:
        return not any(tuple(e["loc"][: len(path)]) == tuple(path) for e in err.errors())
    return True


def _lookup(data: Any, parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(data, dict) or part not in data:
            return MISSING
        data = data[part]
    return data
