"""Finding, blocking, listing and calling plugins (pluggy, entry-point group ``gateway``)."""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any, Callable

import pluggy
from attrs import frozen
from twisted.logger import Logger

from gateway import hookspecs
from gateway.errors import GatewayError
from gateway.hookspecs import PROJECT
from gateway.service.users import LoginPortal

log = Logger()

DISABLE_ENV = "GATEWAY_DISABLE_PLUGINS"
TRACE_ENV = "GATEWAY_TRACE_PLUGINS"


@frozen
class PluginInfo:
    name: str
    version: str
    hooks: tuple[str, ...]


class PluginError(GatewayError):
    """A plugin could not be loaded or registered something inconsistent."""


def make_plugin_manager(environ: dict[str, str] | None = None) -> pluggy.PluginManager:
    """A manager with every ``gateway`` entry point loaded, minus the blocked ones."""
    env = os.environ if environ is None else environ
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in _blocked(env):
        pm.set_blocked(name)
    try:
        pm.load_setuptools_entrypoints(PROJECT)
    except Exception as e:
        raise PluginError(f"a gateway plugin failed to load: {e!r}; block it with {DISABLE_ENV}=NAME") from e
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"a gateway plugin implements a hook that does not exist: {e}") from e
    if env.get(TRACE_ENV):
        pm.trace.root.setwriter(lambda text: log.info("plugin trace: {text}", text=text.rstrip()))
        pm.enable_tracing()
    return pm


def _blocked(env) -> list[str]:
    return [n.strip() for n in env.get(DISABLE_ENV, "").split(",") if n.strip()]


def list_plugins(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """Name, distribution version and implemented hooks of each loaded plugin."""
    versions = {}
    for plugin, dist in pm.list_plugin_distinfo():
        versions[pm.get_name(plugin)] = dist.version
    result = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or ()))
        result.append(PluginInfo(name, versions.get(name, "?"), hooks))
    return sorted(result, key=lambda p: p.name)


def collect(hook: Callable[..., Any], what: str, key: Callable[[Any], str]) -> dict[str, Any]:
    """Call a registration hook and gather what it registers by name, refusing duplicates."""
    found: dict[str, Any] = {}

    def register(item: Any) -> None:
        name = key(item)
        if name in found:
            raise PluginError(f"two plugins register the {what} {name!r}; block one with {DISABLE_ENV}")
        found[name] = item

    try:
        hook(register=register)
    except PluginError:
        raise
    except Exception as e:
        raise PluginError(f"a plugin failed while registering {what}s: {e!r}") from e
    return found


def protocol_handlers(pm: pluggy.PluginManager) -> dict[str, Any]:
    return collect(pm.hook.gateway_register_protocols, "protocol", lambda h: h.name)


def sso_providers(pm: pluggy.PluginManager) -> dict[str, Any]:
    """{name: provider} from gateway_register_sso_providers, refusing a name registered twice."""
    found: dict[str, Any] = {}

    def register(name: str, provider: Any) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"an SSO provider must be registered with a non-empty name, got {name!r}")
        if name in found:
            raise PluginError(f"two plugins register the SSO provider {name!r}; block one with {DISABLE_ENV}")
        if not callable(getattr(provider, "credentials", None)):
            raise PluginError(f"the SSO provider {name!r} has no credentials(app, identity, request) method")
        found[name] = provider

    try:
        pm.hook.gateway_register_sso_providers(register=register)
    except PluginError:
        raise
    except Exception as e:
        raise PluginError(f"a plugin failed while registering SSO providers: {e!r}") from e
    return found


def config_sections(pm: pluggy.PluginManager) -> dict[str, Callable]:
    found: dict[str, Callable] = {}

    def register(name: str, parse: Callable) -> None:
        if name in found:
            raise PluginError(f"two plugins register the config section [{name}]")
        found[name] = parse

    pm.hook.gateway_config_sections(register=register)
    return found


def register_metrics(pm: pluggy.PluginManager, metrics: Any) -> None:
    """Call gateway_register_metrics, giving each plugin instruments named after it in errors."""
    for impl in reversed(pm.hook.gateway_register_metrics.get_hookimpls()):
        try:
            impl.function(metrics=metrics.for_plugin(impl.plugin_name))
        except GatewayError:
            raise
        except Exception as e:
            raise PluginError(f"plugin {impl.plugin_name} failed while registering metrics: {e!r}") from e


def diagnose_checks(pm: pluggy.PluginManager, config: Any) -> list[tuple[str, Callable]]:
    """The (name, check) pairs plugins register for `gateway diagnose` (gateway_diagnose_checks)."""
    found: list[tuple[str, Callable]] = []
    pm.hook.gateway_diagnose_checks(register=lambda name, check: found.append((name, check)), config=config)
    return found


def notify(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> None:
    """Call an observer hook; one plugin's exception is logged and never reaches the caller."""
    caller = getattr(pm.hook, hook_name)
    for impl in reversed(caller.get_hookimpls()):
        try:
            impl.function(**{k: kwargs[k] for k in impl.argnames})
        except Exception:
            log.failure("plugin {plugin} failed in {hook}", plugin=impl.plugin_name, hook=hook_name)


def installed_version(dist_name: str) -> str:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return "?"


def _no_sign_in(identity: dict, challenge: str) -> str:
    raise PluginError("a configuration check signs nobody in")


def check_service_listeners(pm: pluggy.PluginManager, config: Any) -> list[str]:
    """Let plugins build (never bind) their shared listeners for `config`; raises what they raise.

    The http plugin checks per-app options and certificates there, so `twistd gateway` can refuse
    a config before anything starts, and `gateway apps` an app the front door would refuse.
    Returns the warnings the plugins logged meanwhile.
    """
    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    warnings: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical):
            warnings.append(formatEvent(event))

    def register(name: str, endpoint: str, factory: Any) -> None:
        pass

    def open_stream(*args: Any, **kwargs: Any) -> Any:
        raise GatewayError("not serving: this is a check")

    globalLogPublisher.addObserver(observe)
    try:
        pm.hook.gateway_service_listeners(register=register, config=config, open_stream=open_stream,
                                          reactor=MemoryReactorClock(), choose_connector=open_stream,
                                          access=LoginPortal.from_config(config, "", _no_sign_in))
    except GatewayError:
        raise
    except Exception as e:
        raise PluginError(f"a plugin failed while checking the config for its listeners: {e!r}") from e
    finally:
        globalLogPublisher.removeObserver(observe)
    return warnings
