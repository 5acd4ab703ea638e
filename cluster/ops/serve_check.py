"""A strict check of a Ray Serve config: Ray Serve's own schema, and no key that it does not know.

Ray Serve's ``ServeDeploySchema`` (Ray 2.60) drops keys it does not know instead of refusing them: a
deployment with ``max_ongoing_requestz: 8`` validates, and Serve runs it with the default. The check
here walks the config along the fields of Ray Serve's own pydantic models (the application, each
deployment, its ``ray_actor_options`` and ``autoscaling_config``, the HTTP options) and names every key
that none of them declares. The applications' ``args`` belong to the builder (``ClusterConfig``
validates them) and are not walked.
"""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel, ValidationError
from ray.serve.schema import ServeDeploySchema


def serve_config_errors(config: dict) -> list[str]:
    """Every problem of a Serve config (multi-application form): Ray Serve's validation errors and each
    unknown key, as 'dotted.path: message'. Empty when Ray Serve reads the config as written."""
    try:
        ServeDeploySchema.model_validate(config)
        errors = []
    except ValidationError as exc:
        errors = [f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in exc.errors()]
    return errors + _unknown_keys(ServeDeploySchema, config, "")


def _unknown_keys(model: type[BaseModel], data: dict, path: str) -> list[str]:
    """Unknown keys of ``data`` as read by ``model``, and of every nested model its known fields hold."""
    fields = model.model_fields
    names = {name: name for name in fields} | {f.alias: name for name, f in fields.items() if f.alias}
    errors = []
    for key, value in data.items():
        where = f"{path}{key}"
        if key not in names:
            errors.append(f"{where}: unknown key for {model.__name__} (known: {', '.join(sorted(fields))})")
            continue
        if names[key] == "args" and model.__name__ == "ServeApplicationSchema":
            continue
        nested = _nested_model(fields[names[key]].annotation)
        if nested is None:
            continue
        if isinstance(value, dict):
            errors += _unknown_keys(nested, value, f"{where}.")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    label = item.get("name", index)
                    errors += _unknown_keys(nested, item, f"{where}[{label}].")
    return errors


def _nested_model(annotation) -> type[BaseModel] | None:
    """The pydantic model a field holds, alone, optional, in a list or in a union with a plain dict."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            if (found := _nested_model(arg)) is not None:
                return found
    return None
