"""Phase options: the model a handler's module declares, and pipeline.yaml's ``options:`` checked
against it.

A handler's module declares its phase's options as a pydantic model named ``Options``, usually a
``PhaseOptions``. The file's ``options:`` of every phase whose handler's module declares one are
validated with the rest of the file (``levers validate``, ``levers set``, a supervisor or worker
following an edit), and a handler gets the validated model as ``ctx.options``. A module without
``Options`` gets the mapping as written. Finding a model imports the handler's module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from levers.pipeline.model import Phase, Pipeline

# The name under which a handler's module declares its options model.
OPTIONS_MODEL = "Options"


class PhaseOptions(BaseModel):
    """Base of a phase's options model, checked as strictly as the rest of pipeline.yaml: an
    unknown key is an error (with a did-you-mean), a boolean or a string is not a number, and
    infinity and NaN are refused. Declare it in the handler's module as ``class Options``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class NotAnOptionsModel(TypeError):
    """A handler's module names something other than a pydantic model ``Options``."""


def options_model(handler: str) -> type[BaseModel] | None:
    """The options model of the module of handler 'module:function', None when it declares none.
    Imports the module: ImportError (or whatever its code raises) when it cannot be."""
    module_name = handler.partition(":")[0]
    model = getattr(importlib.import_module(module_name), OPTIONS_MODEL, None)
    if model is None:
        return None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise NotAnOptionsModel(f"{module_name}.{OPTIONS_MODEL} is not a pydantic model")
    return model


def phase_options(phase: Phase) -> Any:
    """What a handler gets as ``ctx.options``: the validated model, or the mapping as written when
    the module declares none. Raises ValidationError for options the model refuses."""
    model = options_model(phase.handler)
    return dict(phase.options) if model is None else model.model_validate(phase.options)


@dataclass(frozen=True)
class RefusedOptions:
    """A phase's options its module's model refuses (pydantic's ``errors``), or a module whose
    ``Options`` is not a model (``model`` None, ``errors`` empty, the reason in ``message``)."""

    phase: str
    model: type[BaseModel] | None
    errors: list[Any] = field(default_factory=list)
    message: str = ""


def refused_options(spec: Pipeline) -> list[RefusedOptions]:
    """Every phase whose options its module's model refuses. A handler whose module cannot be
    imported is skipped: the import check (``handler_problems``) reports it."""
    found: list[RefusedOptions] = []
    for name, phase in spec.phases.items():
        try:
            model = options_model(phase.handler)
        except NotAnOptionsModel as exc:
            found.append(RefusedOptions(name, None, message=str(exc)))
            continue
        except Exception:  # any error of user code while importing: the import check's to report
            continue
        if model is None:
            continue
        try:
            model.model_validate(phase.options)
        except ValidationError as exc:
            found.append(RefusedOptions(name, model, exc.errors()))
    return found
