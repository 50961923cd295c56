"""Configuration: gate.yaml, policy files and rule plugins, read into checked objects.

``load_all`` builds everything or raises (nothing half-applied: a reload builds anew, then
swaps); ``check_config`` gathers every problem for ``smtpgate check-config``.
"""
from __future__ import annotations

from typing import Callable

from ..errors import ConfigError, PluginError, Problem
from ..pipeline.plugins import PluginRegistry
from ..pipeline.policy import Policy, PolicySet, build_policies
from ..pipeline.rule import GateContext
from .gate import (DnsConfig, DownstreamConfig, GateConfig, Limits, LogConfig, TLSConfig,
                   find_config_path, load_gate_config, sqlite_path)
from .policies import PolicySpec, RuleEntry, check_domain, load_policy_specs

__all__ = [
    "DnsConfig", "DownstreamConfig", "GateConfig", "Limits", "LogConfig", "TLSConfig",
    "PolicySpec", "RuleEntry", "Policy", "PolicySet", "PluginRegistry",
    "find_config_path", "load_gate_config", "sqlite_path", "check_domain", "load_policy_specs",
    "build_policies", "load_all", "check_config", "ConfigError", "PluginError", "Problem",
]

GateContextFactory = Callable[[GateConfig], GateContext]


def load_all(cli_path: str | None,
             gate_context_factory: GateContextFactory | None = None) -> tuple[GateConfig, PluginRegistry, PolicySet]:
    """Find and read gate.yaml, load the plugins, read and build the policies.

    ``gate_context_factory(config)`` lends the rules their clock, stores and resolver; without
    it they get ``GateContext(clock=None)``. Raises ConfigError or PluginError."""
    config = load_gate_config(find_config_path(cli_path))
    registry = PluginRegistry.load(config.plugins)
    specs = load_policy_specs(config.policies)
    gate = gate_context_factory(config) if gate_context_factory else GateContext(clock=None)
    return config, registry, build_policies(specs, registry, gate)


def check_config(cli_path: str | None) -> list[Problem]:
    """Every problem in gate.yaml, the plugins, the policies and the rules' options; [] = fine.

    Rules are built with ``GateContext(clock=None)``, so a rule must not need its stores in
    ``setup()``."""
    problems: list[Problem] = []
    config = load_gate_config(find_config_path(cli_path), problems)
    registry = PluginRegistry.load(config.plugins, problems=problems)
    specs = load_policy_specs(config.policies, problems)
    build_policies(specs, registry, GateContext(clock=None), problems)
    return problems
