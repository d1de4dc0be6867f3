"""`gateway --service URL` runs every store-backed admin command through the admin API of a real
service node: groups rename|delete, apps list|add|set|remove (private apps with segments and
assignments), token create|list, users token create|list|revoke, users revoke and logs session;
each gives what the same command run on the service's store gives, and refuses what it refuses
with the same message. The API itself refuses bad JSON, a missing, unknown or mistyped field and
an unknown name with a JSON error, and logs each change with the admin token's id and name."""

from __future__ import annotations

import json
import re
import stat

import pytest

from gateway_harness import wait_until
from test_admin_api import admin_service, admin_url, api, create_admin_token, request, token_text

TIME = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d(\.\d+)?)?(\+00:00| UTC)?")
HEX_ID = re.compile(r"\b[0-9a-f]{12,}\b")


@pytest.fixture
def remote(gw):
    """A service with an admin listener, and a runner of `gateway` commands on it: ("local", ...)
    with --config on its store, ("remote", ...) with --service and an admin token."""
    svc = admin_service(gw)
    token_id, path = create_admin_token(gw, svc, name="ops-bot")

    def run(mode: str, *argv: str, stdin: str | None = None):
        if mode == "local":
            return gw.cli(*argv, "--config", str(svc.config_path), stdin=stdin)
        return gw.cli("--service", admin_url(svc), "--admin-token-file", str(path), *argv, stdin=stdin)

    run.svc, run.token_id, run.token = svc, token_id, token_text(path)
    return run


def _same(text: str, tag: str, net: str) -> str:
    """`text` with what differs between the two runs (names, networks, ids, times) made alike."""
    text = text.replace(f"-{tag}", "-TAG").replace(f"10.{net}.0.0", "10.NET.0.0")
    return HEX_ID.sub("ID", TIME.sub("TIME", text))


def _scenario(run, mode: str, tag: str, net: str, tmp) -> list[tuple[int, str, str]]:
    """Each store-backed command once, in `mode`; (exit status, stdout, stderr) of each, made alike."""
    token_file = tmp / f"enrol-{tag}.token"
    steps = [
        ("groups", "create", f"g-{tag}"),
        ("groups", "rename", f"g-{tag}", f"h-{tag}"),
        ("apps", "add", f"web-{tag}", "--external-url", f"http://web-{tag}.apps.example.test/",
         "--internal-url", "http://127.0.0.1:9/", "--group", f"h-{tag}"),
        ("apps", "add", f"priv-{tag}", "--segment", f"tcp 10.{net}.0.0/16:22,80", "--segment",
         f"udp 10.{net}.0.0/16:53", "--allow-user", "alice@example.test", "--allow-group", "ops",
         "--group", f"h-{tag}"),
        ("apps", "set", f"web-{tag}", "--option", "translate_host=false"),
        ("apps", "set", f"web-{tag}", "--option", "translate_host=false"),
        ("apps", "set", f"priv-{tag}", "--allow-user", "bob@example.test"),
        ("apps", "list", "--json"),
        ("apps", "remove", f"web-{tag}"),
        ("groups", "delete", f"h-{tag}"),
        ("token", "create", "--group", f"h-{tag}", "--output", str(token_file)),
        ("token", "list"),
        ("users", "token", "create", "--user", f"u-{tag}", "--name", "U", "--email", f"u-{tag}@example.test",
         "--group", "ops", "--expires", "1d"),
        ("users", "token", "create", "--user", f"u-{tag}", "--expires", "2h"),
        ("users", "token", "list", "--user", f"u-{tag}"),
        ("logs", "session", "on", "--group", f"h-{tag}"),
        ("logs", "session", "list"),
        ("logs", "session", "off", "--group", f"h-{tag}"),
        ("apps", "remove", f"priv-{tag}"),
        ("groups", "delete", f"h-{tag}"),
    ]
    results = []
    for argv in steps:
        result = run(mode, *argv)
        out = result.stdout
        if argv[:2] == ("apps", "list"):   # only this run's apps, without their store times
            out = json.dumps([{k: v for k, v in a.items() if not k.endswith("_at")}
                              for a in json.loads(out) if a["name"].endswith(f"-{tag}")], indent=1)
        if argv[:2] == ("token", "list"):
            out = "\n".join(line for line in out.splitlines() if f"h-{tag}" in line)
        if argv[:3] == ("users", "token", "create"):
            assert re.fullmatch(r"\S+\.\S+\.\S+\.\S+\n", out), out
            out = "TOKEN"
        if argv[:3] == ("logs", "session", "list"):
            out = "\n".join(line for line in out.splitlines() if f"h-{tag}" in line)
        results.append((result.returncode, _same(out, tag, net), _same(result.stderr, tag, net)))
    credentials = run(mode, "users", "token", "list", "--user", f"u-{tag}").stdout
    first = re.search(r"^(\S+)\s+u-", credentials, re.M).group(1)
    for argv in [("users", "token", "revoke", first), ("users", "token", "revoke", first),
                 ("users", "revoke", "--user", f"u-{tag}"), ("users", "revoke", "--user", f"u-{tag}")]:
        result = run(mode, *argv)
        results.append((result.returncode, _same(result.stdout, tag, net), _same(result.stderr, tag, net)))
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and token_file.read_text().count(".") >= 3
    return results


def test_every_store_backed_command_gives_the_same_result_remotely(gw, remote, tmp_path):
    """Each command run with --service does and shows what it does on the service's store: the same
    exit status and output (names, ids and times aside), the enrolment token written 0600 as locally."""
    local = _scenario(remote, "local", "lx", "1", tmp_path)
    through_api = _scenario(remote, "remote", "rx", "2", tmp_path)
    assert [step for step, (code, _, _) in enumerate(local) if code] == [9]
    assert "cannot delete group 'h-TAG': apps priv-TAG in the store name it" in local[9][2]
    assert local[5][1] == "app 'web-TAG' is so already\n"
    for step, (mine, theirs) in enumerate(zip(local, through_api)):
        assert mine[:2] == theirs[:2], f"step {step}"
        if mine[0] == 0:
            assert mine[2] == theirs[2], f"step {step}"
        else:   # the service's refusal, word for word, after what the API call said
            assert mine[2].removeprefix("gateway: error: ").strip() in theirs[2], f"step {step}"
    assert any("revoked" in out for _, out, _ in through_api[-4:])
    log = remote.svc.proc.log()
    assert f"gateway apps add (name='priv-rx', group='h-rx') by admin token {remote.token_id} (ops-bot)" in log
    assert f"gateway users revoke (user='u-rx') by admin token {remote.token_id} (ops-bot)" in log
    gw.assert_no_secret_in_logs()


REFUSALS = [
    # (setup commands, the refused command, words of the refusal)
    ([("groups", "create", "lab"), ("groups", "create", "office"),
      ("apps", "add", "ssh", "--segment", "tcp 10.9.0.0/16:22", "--group", "lab", "--allow-user", "alice")],
     ("apps", "add", "ssh2", "--segment", "tcp 10.9.1.0/24:22", "--group", "office", "--allow-group", "ops"),
     "--segment: "),
    ([], ("apps", "add", "open", "--segment", "tcp 10.8.0.0/16:22"), "--allow-user: expected options.allowed_users"),
    ([], ("apps", "add", "web", "--external-url", "https://w.example.test/", "--internal-url", "http://x:1/",
          "--group", "nosuch"), "--group: no connector group 'nosuch'"),
    ([], ("apps", "add", "bad", "--segment", "nonsense"), "--segment (#1): expected"),
    ([], ("apps", "set", "nope", "--group", "default"), "no app 'nope' in the store"),
    ([], ("apps", "remove", "nope"), "no app 'nope' in the store"),
    ([], ("groups", "rename", "nosuch", "other"), "no group named 'nosuch'"),
    ([], ("groups", "rename", "default", "Bad Name"), "a group name must match"),
    ([], ("groups", "delete", "nosuch"), "no group named 'nosuch'"),
    ([], ("token", "create", "--group", "nosuch"), "no connector group 'nosuch'"),
    ([], ("users", "token", "create", "--user", "carol", "--expires", "0d"), "--expires: expected a duration"),
    ([], ("users", "token", "revoke", "nosuchid"), "no user credential 'nosuchid'"),
    ([], ("users", "revoke", "--user", "nobody"), "--user: no credentials of user 'nobody'"),
    ([], ("logs", "session", "on", "--group", "nosuch"), "no connector group 'nosuch'"),
    ([], ("logs", "session", "on"), "needs --group G or --connector C"),
]


@pytest.mark.parametrize("setup, argv, words", REFUSALS, ids=[" ".join(r[1][:3]) for r in REFUSALS])
def test_a_remote_command_is_refused_as_the_local_one(remote, setup, argv, words):
    """What the command refuses on the service's store, --service refuses with the same message, and
    nothing changes."""
    for step in setup:
        assert remote("local", *step).returncode == 0
    before = remote("local", "apps", "list", "--json").stdout, remote("local", "groups", "list").stdout
    local = remote("local", *argv)
    through_api = remote("remote", *argv)
    assert local.returncode == 1 and words in local.stderr, local.stderr
    assert through_api.returncode == 1, through_api.stderr
    assert local.stderr.removeprefix("gateway: error: ").strip() in through_api.stderr
    assert (remote("local", "apps", "list", "--json").stdout, remote("local", "groups", "list").stdout) == before


def test_the_api_refuses_bad_calls_with_what_to_do(remote):
    """Bad JSON, a missing, unknown or mistyped field, a value the command refuses: 400 saying what to do;
    an unknown name: 404; nothing stored."""
    svc, token = remote.svc, remote.token
    response = request(svc, "POST", "/api/v1/apps", b"{not json", {"Authorization": f"Bearer {token}"})
    body = json.loads(response.body)
    assert (response.status, body["error"]) == (400, "bad_request") and "JSON object" in body["message"]
    status, body, _ = api(svc, "POST", "/api/v1/apps", token=token, body={"group": "default"})
    assert (status, body["error"]) == (400, "bad_request") and "missing field 'name'" in body["message"]
    status, body, _ = api(svc, "POST", "/api/v1/apps", token=token, body={"name": "x", "segments": ["tcp a:1"]})
    assert status == 400 and "unknown field 'segments'" in body["message"] and "segment" in body["message"]
    status, body, _ = api(svc, "POST", "/api/v1/apps", token=token, body={"name": "x", "segment": "tcp a:1"})
    assert status == 400 and "field 'segment': expected a list of text" in body["message"]
    status, body, _ = api(svc, "POST", "/api/v1/apps", token=token, body={"name": "x", "segment": ["nonsense"]})
    assert (status, body["error"]) == (400, "refused") and "--segment (#1): expected" in body["message"]
    status, body, _ = api(svc, "POST", "/api/v1/apps", token=token, body={"name": "x", "segment": ["tcp 10.0.0.0/8:22"]})
    assert status == 400 and "expected options.allowed_users or options.allowed_groups" in body["message"]
    status, body, _ = api(svc, "POST", "/api/v1/groups/default/rename", token=token, body={"new": "Bad Name"})
    assert status == 400 and "a group name must match" in body["message"]
    status, body, _ = api(svc, "POST", "/api/v1/users/tokens", token=token, body={"user": "c", "expires": "0d"})
    assert status == 400 and "--expires: expected a duration" in body["message"]
    status, body, _ = api(svc, "PUT", "/api/v1/session-log", token=token, body={"state": "maybe", "group": "a"})
    assert status == 400 and "one of on, off, inherit" in body["message"]
    status, body, _ = api(svc, "DELETE", "/api/v1/groups/nosuch", token=token)
    assert (status, body["error"]) == (404, "not_found") and "gateway groups list" in body["message"]
    status, body, _ = api(svc, "POST", "/api/v1/users/credentials/nosuch/revoke", token=token)
    assert (status, body["error"]) == (404, "not_found")
    status, body, _ = api(svc, "POST", "/api/v1/apps", token=token, body={"name": "x", "segment": ["tcp 10.0.0.0/8:22"], "allow_user": ["a"],
                                                                            "group": "nosuch"})
    assert (status, body["error"]) == (404, "not_found") and "gateway groups create nosuch" in body["message"]
    status, body, _ = api(svc, "GET", "/api/v1/apps", token=token)
    assert status == 200 and [a["name"] for a in body["apps"]] == []
    status, body, _ = api(svc, "POST", "/api/v1/apps", token=None, body={"name": "x"})
    assert status == 401


def test_a_remote_enrolment_token_enrols_a_connector(gw, remote, tmp_path):
    """The enrolment token `gateway --service URL token create` hands over is the service's: a
    connector enrols with it and lands in the token's group."""
    assert remote("remote", "groups", "create", "lab").returncode == 0
    path = tmp_path / "enrol.token"
    result = remote("remote", "token", "create", "--group", "lab", "--output", str(path))
    assert result.returncode == 0 and "for group 'lab' written to" in result.stderr, result.stderr
    result = gw.register(remote.svc, name="far", token=path)
    assert result.returncode == 0 and "in group 'lab'" in result.stdout, result.stderr
    wait_until(lambda: "used by" in remote("remote", "token", "list").stdout, 20, "the token used")
    assert token_text(path).split(".")[2] not in remote.svc.proc.log()
