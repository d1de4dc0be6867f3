"""Tests for `gateway apps list|add|set|remove` on a config file and its store."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from gateway import cli
from gateway.store.sqlite import SQLiteStore

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
BLOG = ["--external-url", "http://blog.example.test/", "--internal-url", "http://10.0.0.6:8080/"]


def service_config(tmp_path, apps_toml: str):
    """svc.toml with a [service] and ``apps_toml``; its store exists and knows group 'office'."""
    config = tmp_path / "svc.toml"
    config.write_text('[service]\nstate_dir = "state"\nconfig_interval = 30\n\n' + apps_toml)
    (tmp_path / "state").mkdir()
    store = SQLiteStore(tmp_path / "state" / "gateway.db")
    store.create_group("office", NOW)
    store.close()
    return config


@pytest.fixture
def service(tmp_path):
    """A service config with a web app (wiki) and a tcp app (ssh, group lab); the store knows group 'office'."""
    return service_config(
        tmp_path,
        '[[apps]]\nname = "wiki"\nexternal_url = "http://wiki.example.test/"\ninternal_url = "http://10.0.0.5/"\n\n'
        '[[apps]]\nname = "ssh"\ngroup = "lab"\nlisten = "tcp:2222"\ndestination = "10.0.0.9:22"\noptions.preauth = "none"\n')


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def apps(service, capsys, *argv):
    return run(capsys, "apps", *argv, "--config", str(service))


def stored(service):
    store = SQLiteStore(service.parent / "state" / "gateway.db")
    try:
        return {a.name: a for a in store.list_apps()}
    finally:
        store.close()


def test_add_stores_the_app_as_given(service, capsys):
    """add keeps only what the flags said (defaults stay the service's), with TOML-typed options."""
    code, out, err = apps(service, capsys, "add", "blog", *BLOG, "--group", "office", "--affinity", "client",
                          "--option", "translate_host=false", "--option", "note=hello world")
    assert code == 0, err
    assert "app 'blog' added" in out and "within config_interval (30 s)" in out
    blog = stored(service)["blog"]
    assert blog.group == "office"
    assert blog.definition == {
        "external_url": "http://blog.example.test/", "internal_url": "http://10.0.0.6:8080/", "affinity": "client",
        "options": {"translate_host": False, "note": "hello world"},
    }


def test_list_shows_both_sources(service, capsys):
    """list has a SOURCE column: config for the file's apps, store for the command's."""
    assert apps(service, capsys, "add", "blog", *BLOG)[0] == 0
    code, out, _ = apps(service, capsys, "list")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "GROUP", "EXTERNAL", "INTERNAL", "NOTE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["blog"] == ["blog", "store", "default", "http://blog.example.test/", "http://10.0.0.6:8080/", "-"]
    assert rows["wiki"] == ["wiki", "config", "default", "http://wiki.example.test/", "http://10.0.0.5/", "-"]
    assert rows["ssh"][:5] == ["ssh", "config", "lab", "tcp:2222", "10.0.0.9:22"]
    code, out, _ = apps(service, capsys, "list", "--json")
    entries = {e["name"]: e for e in json.loads(out)}
    assert (entries["blog"]["source"], entries["blog"]["destination"], entries["blog"]["served"]) == (
        "store", "10.0.0.6:8080", True)
    assert entries["wiki"]["source"] == "config"


@pytest.mark.parametrize("argv, message", [
    (["--external-url", "ftp://blog.example.test/", "--internal-url", "http://10.0.0.6/"],
     "--external-url: expected a URL starting with https:// or http:// (unknown scheme: ftp:)"),
    (["--external-url", "http://blog.example.test/", "--internal-url", "http://10.0.0.6/app"],
     '--internal-url: expected a URL whose path ends with "/"'),
    (["--external-url", "http://WIKI.example.test:80/", "--internal-url", "http://10.0.0.6/"],
     "--external-url: expected an external URL unique among apps, got 'http://WIKI.example.test:80/' "
     "(app 'wiki' in "),
    ([*BLOG, "--group", "nowhere"],
     "--group: no connector group 'nowhere'; known groups: default, lab, office;"
     " create it first with `gateway groups create nowhere`"),
    ([*BLOG, "--affinity", "sticky"], '--affinity: expected one of "none", "client", "user", got "sticky"'),
    ([*BLOG, "--option", "translate_host"], "--option: expected KEY=VALUE"),
    ([*BLOG, "--option", "translate_host=yes"],
     "the http plugin refuses app 'blog': app blog: options.translate_host: expected true or false"),
    ([*BLOG, "--connect-timeout", "0"], "--connect-timeout: expected a number of seconds > 0"),
])
def test_add_refuses_bad_input_naming_the_flag(service, capsys, argv, message):
    """Every refusal names the flag (or what to do) and stores nothing."""
    code, _, err = apps(service, capsys, "add", "blog", *argv)
    assert code == 1
    assert message in err
    assert stored(service) == {}


def test_names_are_unique_and_the_file_has_priority(service, capsys):
    """A name the file uses, or the store has, is refused; so is a bad name."""
    code, _, err = apps(service, capsys, "add", "wiki", "--external-url", "http://w2.example.test/",
                        "--internal-url", "http://10.0.0.6/")
    assert code == 1 and "NAME: app 'wiki' is in" in err and "the config file's apps win" in err
    assert apps(service, capsys, "add", "blog", *BLOG)[0] == 0
    code, _, err = apps(service, capsys, "add", "blog", "--external-url", "http://b2.example.test/",
                        "--internal-url", "http://10.0.0.6/")
    assert code == 1 and "app 'blog' is in the store already: change it with `gateway apps set blog`" in err
    code, _, err = apps(service, capsys, "add", "Blog", *BLOG)
    assert code == 1 and "NAME: expected a name matching" in err


def test_external_url_unique_among_stored_apps(service, capsys):
    """Same scheme, host, port and path as a stored app: refused, naming it; another path is fine."""
    assert apps(service, capsys, "add", "blog", *BLOG)[0] == 0
    code, _, err = apps(service, capsys, "add", "blog2", "--external-url", "http://blog.example.test:80/",
                        "--internal-url", "http://10.0.0.7/")
    assert code == 1 and "(app 'blog' in the store has the same scheme, host, port and path" in err
    code, _, err = apps(service, capsys, "add", "blog2", "--external-url", "http://blog.example.test/v2/",
                        "--internal-url", "http://10.0.0.7/")
    assert code == 0, err


def test_group_named_by_the_file_is_made_in_the_store(service, capsys):
    """A group only the config file names (lab) is accepted and created in the store."""
    assert apps(service, capsys, "add", "blog", *BLOG, "--group", "lab")[0] == 0
    assert stored(service)["blog"].group == "lab"


def test_set_changes_only_what_is_given(service, capsys):
    """set keeps the other keys; --unset-option drops one; the checks of add apply."""
    assert apps(service, capsys, "add", "blog", *BLOG, "--option", "translate_host=false")[0] == 0
    code, out, err = apps(service, capsys, "set", "blog", "--internal-url", "http://10.0.0.7/", "--group", "office",
                          "--unset-option", "translate_host")
    assert code == 0, err
    blog = stored(service)["blog"]
    assert blog.group == "office"
    assert blog.definition == {"external_url": "http://blog.example.test/", "internal_url": "http://10.0.0.7/"}
    code, _, err = apps(service, capsys, "set", "blog", "--external-url", "http://wiki.example.test/")
    assert code == 1 and "unique among apps" in err
    code, _, err = apps(service, capsys, "set", "wiki", "--internal-url", "http://10.0.0.8/")
    assert code == 1 and "not in the store: change it in the file and reload" in err
    code, _, err = apps(service, capsys, "set", "nope", "--internal-url", "http://10.0.0.8/")
    assert code == 1 and "no app 'nope' in the store; see `gateway apps list`" in err


def test_remove(service, capsys):
    """remove deletes a stored app; a file app or an unknown name is refused with what to do."""
    assert apps(service, capsys, "add", "blog", *BLOG)[0] == 0
    code, out, _ = apps(service, capsys, "remove", "blog")
    assert code == 0 and "app 'blog' removed from the store" in out
    assert stored(service) == {}
    code, _, err = apps(service, capsys, "remove", "blog")
    assert code == 1 and "no app 'blog' in the store" in err
    code, _, err = apps(service, capsys, "remove", "wiki")
    assert code == 1 and "not in the store: remove it in the file and reload the service (SIGHUP)" in err


def test_status_and_groups_list_show_stored_apps(service, capsys):
    """The other commands that list apps per group include the stored ones."""
    assert apps(service, capsys, "add", "blog", *BLOG, "--group", "office")[0] == 0
    code, out, _ = run(capsys, "status", "--config", str(service))
    assert "group office:" in out and "apps: blog" in out
    code, out, _ = run(capsys, "groups", "list", "--config", str(service))
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["office"][2] == "blog"
    code, _, err = run(capsys, "groups", "delete", "office", "--config", str(service))
    assert code == 1 and "apps blog in the store name it" in err


def test_the_front_door_dry_run_refuses_and_warns(service, capsys, tmp_path):
    """What the http plugin would refuse at bind time is refused now; what it would warn about is shown."""
    code, _, err = apps(service, capsys, "add", "secure", "--external-url", "https://secure.example.test/",
                        "--internal-url", "http://10.0.0.6/")
    assert code == 1 and "the http plugin refuses app 'secure'" in err and "tls_listen is not set" in err

    from testca import CA

    cert, key = CA(tmp_path).issue("wiki", ["wiki.example.test"])
    text = service.read_text().replace(
        "[[apps]]",
        f'[http]\ntls_listen = "tcp:0"\n\n[[http.certificates]]\ncert = "{cert}"\nkey = "{key}"\n\n[[apps]]', 1)
    service.write_text(text)
    code, out, err = apps(service, capsys, "add", "secure", "--external-url", "https://secure.example.test/",
                          "--internal-url", "http://10.0.0.6/")
    assert code == 0, err
    assert "gateway: warning: https front door: app secure: no certificate covers its host secure.example.test" in err
    code, _, err = apps(service, capsys, "add", "blog", *BLOG)
    assert code == 0 and "warning" not in err  # the warning about secure is not this app's
