"""A real twistd refuses the Private Access config mistakes before binding anything: a listen app
that does not say options.preauth = "none", a private app assigned to nobody, and overlapping
segments of apps in two connector groups; a valid private app starts with no listener of its own."""

from __future__ import annotations

import pytest

from gateway_harness import HOST, port_is_free

SEGMENT = {"destination": "10.77.0.0/16", "ports": "22", "protocol": "tcp"}


def refused_at_start(gw, svc, key: str, words: str) -> None:
    """twistd and check-config exit non-zero naming the key and words; nothing is bound."""
    started = gw.twistd(svc.config_path, timeout=30)
    out = started.stdout + started.stderr
    assert started.returncode != 0, out
    assert key in out and words in out, out
    assert "listening for tunnels" not in out and "Traceback" not in out, out
    assert port_is_free(svc.port)
    checked = gw.cli("check-config", str(svc.config_path))
    assert checked.returncode != 0 and key in checked.stderr, checked.stdout + checked.stderr


@pytest.mark.timeout(90)
def test_listen_app_without_preauth_none_is_refused(gw):
    """A listen app whose options.preauth is not "none" stops twistd before its port is bound."""
    svc = gw.service(start=False)
    port = svc.add_app("ssh", f"{HOST}:9", options={"preauth": "passthrough"})
    refused_at_start(gw, svc, "apps[0].options.preauth", 'add options.preauth = "none"')
    assert port_is_free(port)


@pytest.mark.timeout(90)
def test_private_app_assigned_to_nobody_is_refused(gw):
    """A private app without allowed_users or allowed_groups stops twistd: nobody could ever use it."""
    svc = gw.service(start=False)
    svc.apps.append({"name": "corp", "port": 0, "segments": [SEGMENT], "options": {"allowed_users": []}})
    svc.write_config()
    refused_at_start(gw, svc, "apps[0].options.allowed_users", "reachable only by the users assigned to it")


@pytest.mark.timeout(90)
def test_overlapping_segments_of_two_groups_are_refused(gw):
    """Two private apps of different groups with overlapping segments stop twistd, naming both."""
    svc = gw.service(start=False)
    svc.apps.append({"name": "east", "group": "east", "port": 0, "segments": [SEGMENT],
                     "options": {"allowed_users": ["alice"]}})
    svc.apps.append({"name": "west", "group": "west", "port": 0,
                     "segments": [{"destination": "10.77.1.2", "ports": "20-30"}],
                     "options": {"allowed_groups": ["staff"]}})
    svc.write_config()
    refused_at_start(gw, svc, "apps[1].segments[0]", 'overlaps apps[0].segments[0]')


@pytest.mark.timeout(90)
def test_valid_private_app_starts_without_a_listener(gw):
    """A valid private app next to a listen app: the service starts, and only the listen app has a port."""
    svc = gw.service(start=False)
    listen_port = svc.add_app("ssh", f"{HOST}:9")
    svc.apps.append({"name": "corp", "port": 0, "segments": [SEGMENT], "options": {"allowed_users": ["alice"]}})
    svc.write_config()
    assert "listen" not in svc.config_path.read_text().split('name = "corp"')[1]
    svc.start()
    assert not port_is_free(listen_port)
    checked = gw.cli("check-config", str(svc.config_path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
