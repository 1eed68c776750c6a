"""Plug-ins by import path: ``module:attribute`` names an object outside the package.

``--dataset``, ``--model-name`` and ``--compressor`` take either a built-in name or
``MODULE:ATTR`` (``mymodels:tiny``, ``pkg.sub:Loader``), imported in whatever process needs
it (the launcher, every rank, the producers): the module must be importable there, e.g. on
``PYTHONPATH``, which the launcher passes to every process it starts. Every failure is a
``PluginError`` (a ``ValueError``) whose message is one line naming the flag and the fix.
"""
from __future__ import annotations

import importlib
import re

_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


class PluginError(ValueError):
    """A plug-in that cannot be imported or breaks its contract; the message is one line."""


def is_import_path(spec: str) -> bool:
    """Whether ``spec`` names a plug-in (``module:attr``) rather than a built-in."""
    return ":" in spec


def load_object(spec: str, flag: str) -> object:
    """The object ``spec`` (``module:attr``, attr may be dotted) names; ``flag`` is the option
    it came from, for the message."""
    if not _IMPORT_PATH.fullmatch(spec):
        raise PluginError(f"{flag} {spec!r} is not MODULE:NAME (e.g. mymodels:tiny)")
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001  (a user's module may raise anything on import)
        fix = " (is its folder on PYTHONPATH?)" if isinstance(e, ModuleNotFoundError) else ""
        raise PluginError(f"{flag} {spec!r}: cannot import {module_name!r}: "
                          f"{type(e).__name__}: {_one_line(e)}{fix}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{flag} {spec!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(f"{flag} {spec!r}: {attr!r} is a {type(obj).__name__}, not callable")
    return obj


def resolve(spec: str, registry: dict, flag: str, unknown: str, plugin: str) -> object:
    """``registry[spec]`` for a built-in name, the imported object for ``module:name``;
    ValueError ``"<unknown> <spec>; use one of <names> or <plugin>"`` for any other name."""
    if is_import_path(spec):
        return load_object(spec, flag)
    if spec not in registry:
        raise ValueError(f"{unknown} {spec!r}; use one of {', '.join(registry)} or {plugin}")
    return registry[spec]


def call(obj, spec: str, flag: str, *args, **kwargs):
    """``obj(*args, **kwargs)``, any exception it raises turned into a one-line PluginError."""
    try:
        return obj(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise PluginError(f"{flag} {spec!r} raised {type(e).__name__}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or "(no message)"
