"""Finding rule classes: the ``smtpgate.rules`` entry points and the ``plugins:`` folders.

Every class is checked when it loads (``check_rule_class``), the pluggy way: a misspelt hook,
a wrong signature, a duplicate name or an import error fails at start-up naming the file.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
from types import ModuleType
from typing import Iterable

from ..errors import PluginError, Problem
from .rule import Rule, check_rule_class

ENTRY_POINT_GROUP = "smtpgate.rules"


class PluginRegistry:
    """Rule classes by name, each with the file it came from."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Rule]] = {}
        self._sources: dict[str, str] = {}

    @classmethod
    def load(cls, folders: Iterable[str] = (), *, entry_points: bool = True, group: str = ENTRY_POINT_GROUP,
             problems: list[Problem] | None = None) -> "PluginRegistry":
        """Entry points first, then each folder. Without ``problems``, any problem raises one
        PluginError listing them all; with it, they are appended and the good classes kept."""
        registry, found = cls(), []
        if entry_points:
            registry.load_entry_points(group, found)
        for folder in folders:
            registry.load_folder(folder, found)
        if problems is None and found:
            raise PluginError("\n".join(map(str, found)))
        if problems is not None:
            problems.extend(found)
        return registry

    def add(self, rule_cls: type[Rule], source: str) -> None:
        """Check and register one class; PluginError if it is unfit or its name is taken."""
        check_rule_class(rule_cls, source)
        name = rule_cls.name
        if self._classes.get(name) is rule_cls:  # reached twice (a class and its module)
            return
        if name in self._classes:
            raise PluginError(f'{source}: rule name "{name}" is already taken by '
                              f"{_describe(self._classes[name])} in {self._sources[name]}")
        self._classes[name], self._sources[name] = rule_cls, source

    def load_entry_points(self, group: str, problems: list[Problem]) -> None:
        for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: (e.name, e.value)):
            where = f"entry point {ep.name} = {ep.value}"
            try:
                target = ep.load()
            except Exception as e:
                problems.append(_import_problem(where, e))
                continue
            if isinstance(target, ModuleType):
                classes = _rule_classes(target)
            elif isinstance(target, type) and issubclass(target, Rule):
                classes = [target]
            else:
                problems.append(Problem(None, None, None, f"{where}: names neither a Rule subclass nor a module"))
                continue
            for rule_cls in classes:
                self._add_reporting(rule_cls, inspect.getsourcefile(rule_cls) or where, problems)

    def load_folder(self, folder: str, problems: list[Problem]) -> None:
        """Every ``*.py`` not starting with ``_``, under a module name unique to its path."""
        try:
            names = sorted(n for n in os.listdir(folder) if n.endswith(".py") and not n.startswith(("_", ".")))
        except OSError as e:
            problems.append(Problem(folder, None, None, f"cannot read the plugins folder: {e.strerror or e}"))
            return
        for filename in names:
            self.load_file(os.path.join(folder, filename), problems)

    def load_file(self, path: str, problems: list[Problem]) -> ModuleType | None:
        """One plugin file: imported under a module name unique to its path, each rule class
        in it checked and registered. The module, or None if it could not be imported."""
        try:
            module = _import_file(path)
        except Exception as e:
            problems.append(_import_problem(path, e))
            return None
        for rule_cls in _rule_classes(module):
            self._add_reporting(rule_cls, path, problems)
        return module

    def _add_reporting(self, rule_cls: type[Rule], source: str, problems: list[Problem]) -> None:
        try:
            self.add(rule_cls, source)
        except PluginError as e:
            message = str(e).removeprefix(f"{source}: ")
            problems.append(Problem(source, _first_line(rule_cls), None, message))

    def get(self, name: str) -> type[Rule]:
        try:
            return self._classes[name]
        except KeyError:
            raise KeyError(f"no rule named {name!r}") from None

    def names(self) -> list[str]:
        return sorted(self._classes)

    def source(self, name: str) -> str:
        return self._sources[name]

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __len__(self) -> int:
        return len(self._classes)


def _rule_classes(module: ModuleType) -> list[type[Rule]]:
    """Rule subclasses *defined* in the module (not imported into it); ``_Private`` ones are
    helpers (shared bases), not rules."""
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, Rule) and obj is not Rule
            and obj.__module__ == module.__name__ and not obj.__name__.startswith("_")]


def _import_file(path: str) -> ModuleType:
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    name = f"smtpgate_plugin_{digest}_{os.path.splitext(os.path.basename(path))[0]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError("not importable as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickle and inspect look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_problem(where: str, error: Exception) -> Problem:
    """Where the import failed (the plugin's own line when it is in the traceback), without
    the traceback itself."""
    if isinstance(error, SyntaxError) and error.filename == where:
        return Problem(where, error.lineno, error.offset, f"cannot import: SyntaxError: {error.msg}")
    line = None
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == where:
            line = tb.tb_lineno
        tb = tb.tb_next
    return Problem(where, line, None, f"cannot import: {type(error).__name__}: {error}")


def _first_line(rule_cls: type) -> int | None:
    try:
        return inspect.getsourcelines(rule_cls)[1]
    except (OSError, TypeError):
        return None


def _describe(rule_cls: type) -> str:
    return f"{rule_cls.__module__}.{rule_cls.__qualname__}"
