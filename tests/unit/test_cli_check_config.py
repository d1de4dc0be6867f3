"""Tests for `gateway check-config`: it refuses what `twistd gateway` would refuse at start."""

from __future__ import annotations

from gateway import cli
from gateway.hookspecs import hookimpl

SERVICE = '[service]\nstate_dir = "state"\n\n[http]\nlisten = "tcp:8080"\n\n'
WIKI = '[[apps]]\nname = "wiki"\nexternal_url = "http://wiki.example.test/"\ninternal_url = "http://10.0.0.5/"\n'


def check(tmp_path, capsys, text: str) -> tuple[int, str, str]:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    code = cli.main(["check-config", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_good_service_config_is_ok(tmp_path, capsys):
    code, out, err = check(tmp_path, capsys, SERVICE + WIKI)
    assert (code, err) == (0, "")
    assert out.endswith("gateway.toml: OK (service, 1 app)\n")


def test_a_web_app_option_the_front_door_refuses_fails_the_check(tmp_path, capsys):
    """Per-app options are checked by the http plugin when it builds the front door, which the
    config loader alone does not do: check-config asks the plugins as twistd does."""
    code, out, err = check(tmp_path, capsys, SERVICE + WIKI + 'options = { backend_timeout = "forever" }\n')
    assert code == 1 and out == ""
    assert "app wiki: options.backend_timeout" in err and "'forever'" in err


def test_a_plugin_crashing_on_the_config_is_reported_not_raised(tmp_path, capsys, monkeypatch):
    real = cli.plugins.make_plugin_manager

    class Crashing:
        @hookimpl
        def gateway_service_listeners(self, register, config, open_stream, reactor):
            raise RuntimeError("boom")

    def make(*args, **kwargs):
        pm = real(*args, **kwargs)
        pm.register(Crashing(), name="crashing")
        return pm

    monkeypatch.setattr(cli.plugins, "make_plugin_manager", make)
    code, out, err = check(tmp_path, capsys, SERVICE + WIKI)
    assert code == 1 and out == ""
    assert "a plugin failed while checking the config for its listeners" in err and "boom" in err


SSH = ('[[apps]]\nname = "ssh"\nlisten = "tcp:2222:interface=127.0.0.1"\ndestination = "10.0.0.9:22"\n'
       'options.preauth = "none"\n')


def test_a_listen_app_is_ok_with_a_warning_that_anyone_may_connect(tmp_path, capsys):
    """A listen app (preauth = "none") passes with a warning on stderr naming it and its listen."""
    code, out, err = check(tmp_path, capsys, SERVICE + WIKI + SSH)
    assert code == 0 and out.endswith("OK (service, 2 apps)\n")
    assert err == ('gateway: warning: app ssh: anyone who can reach tcp:2222:interface=127.0.0.1 may connect'
                   ' (options.preauth = "none"); publish it as a private app with segments so users sign in\n')


def test_web_and_private_apps_get_no_such_warning(tmp_path, capsys):
    """Apps whose users sign in (web, private) are not warned about."""
    private = ('[[apps]]\nname = "corp"\noptions.allowed_users = ["alice"]\n'
               '[[apps.segments]]\ndestination = "10.1.0.0/16"\nports = "22"\n')
    code, out, err = check(tmp_path, capsys, SERVICE + WIKI + private)
    assert (code, err) == (0, "")
