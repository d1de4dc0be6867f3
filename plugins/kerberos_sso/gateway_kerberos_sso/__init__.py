"""Single sign-on to integrated-Windows-auth back ends by Kerberos constrained delegation (issue 12).

A connector with a keytab for its delegating account gets, for a user the service already
signed in, a service ticket to the back end's SPN without the user's password (S4U2Self, then
S4U2Proxy) and sends it as ``Authorization: Negotiate``. Loaded through the ``gateway``
entry point like any plugin; apps select it with ``options.sso = "kerberos"``.

- ``settings``: the connector's ``[kerberos]`` table and the apps' ``kerberos_*`` options;
- ``provider``: the ISSOProvider (tokens, 401 challenges, the mutual-auth reply, failures that
  name cause and fix, counters);
- ``delegation``: the KDC exchanges with python-gssapi (the ``kerberos`` extra), and
  ``delegate_cifs``, the building block for SMB;
- ``cache``: delegated credentials per user and SPN, shared while in flight, until shortly
  before the ticket ends.

Importing this package does not import gssapi: the service, or a connector without the extra,
loads the plugin and only an app that asks for it fails, saying what is missing.
"""

from __future__ import annotations

from typing import Any

from gateway import hookimpl

from .provider import KerberosSSO
from .settings import SECTION, parse_section

PROVIDER_NAME = "kerberos"


@hookimpl
def gateway_config_sections(register: Any) -> None:
    register(SECTION, parse_section)


@hookimpl
def gateway_diagnose_checks(register: Any, config: Any) -> None:
    """`gateway diagnose` on a connector with a [kerberos] table: KDC reach, the keytab's keys."""
    settings = config.sections.get(SECTION)
    if settings is None:
        return
    from .diagnose import kdc_checks, keytab_check

    register("kdc", lambda reactor: kdc_checks(reactor, settings))
    register("keytab", lambda reactor: [keytab_check(settings)])


# The provider this process registered (a connector registers one at start): its counters are
# read when the metrics endpoint is scraped.
_registered: list[KerberosSSO] = []


@hookimpl
def gateway_register_sso_providers(register: Any) -> None:
    provider = KerberosSSO()
    _registered[:] = [provider]
    register(PROVIDER_NAME, provider)


@hookimpl
def gateway_register_metrics(metrics: Any) -> None:
    """KDC round trips, cache hits and failures by cause, read from the provider's counters at each scrape."""
    if "connector" in metrics.roles:
        metrics.collect(lambda: counter_families(_registered))


def counter_families(providers: list[KerberosSSO]) -> list[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    totals = {"kdc_exchanges": 0, "cache_hits": 0, "shared_exchanges": 0, "cached_entries": 0}
    failures: dict[str, int] = {}
    for provider in providers:
        counters = provider.counters
        for key in totals:
            totals[key] += counters[key]
        for cause, n in counters["failures"].items():
            failures[str(cause).lower()] = failures.get(str(cause).lower(), 0) + n
    by_cause = CounterMetricFamily("gateway_kerberos_failures", "Kerberos SSO failures by cause (the causes of"
                                   " gateway_kerberos_sso.delegation.Cause).", labels=("cause",))
    for cause, n in sorted(failures.items()):
        by_cause.add_metric((cause,), n)
    return [
        CounterMetricFamily("gateway_kerberos_kdc_round_trips", "KDC exchanges (S4U2Self + S4U2Proxy) started.",
                            value=totals["kdc_exchanges"]),
        CounterMetricFamily("gateway_kerberos_cache_hits", "Requests answered from the delegated-credential cache.",
                            value=totals["cache_hits"]),
        CounterMetricFamily("gateway_kerberos_shared_exchanges", "Requests that waited for a KDC exchange"
                            " already in flight for the same user and SPN.", value=totals["shared_exchanges"]),
        GaugeMetricFamily("gateway_kerberos_cached_credentials", "Delegated credentials in the cache now.",
                          value=totals["cached_entries"]),
        by_cause,
    ]
