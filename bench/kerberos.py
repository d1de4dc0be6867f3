"""bench/kerberos.py -- what Kerberos single sign-on costs (issue 12), in one run.

1. req/s through the front door + connector to a Negotiate-only Apache file with a warm
   credential cache (``sso = "kerberos"``: a new SPNEGO context from cached credentials per
   request, the mutual-auth reply verified) against the same Apache serving a file without
   authentication through a passthrough app; wrk -t1 -cN, keep-alive, one signed-in user.
   Also the same file where Apache authenticates a connection once (GssapiConnectionBound, as
   IIS does for Kerberos by default) through an app in 401-challenge mode
   (``kerberos_preemptive = false``): a token only for each new back-end connection.
   Target: kerberos >= 0.8 x passthrough.
2. cold-cache KDC exchanges per second: S4U2Self + S4U2Proxy for 1,000 distinct users, each
   once, through the plugin's own delegate() in a thread pool the size of [kerberos] threads.

Everything runs on 127.0.0.1 from the test harnesses (tests/integration: kdc_harness's MIT KDC
with the LDAP back end and Apache mod_auth_gssapi, the OpenID provider of test_http_oidc.py,
gateway_harness's twistd processes) and is stopped by PID at the end. Needs what the
integration tests need (scripts/setup.sh --with-tests) and wrk.

    .venv/bin/python bench/kerberos.py [--duration 10] [--conns 50] [--users 1000] [--threads 4]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "integration"), str(ROOT / "tests" / "support")]

from gateway_harness import HOST, Gateway, free_port, toml_table, wait_until  # noqa: E402
from kdc_harness import BACKEND, CONNECTOR, KRB5_VARIABLES, KerberosRealm, NegotiateApache, principal  # noqa: E402
from test_http_oidc import SECRET, Browser, OpenIDProvider, sign_in  # noqa: E402

KERBEROS_HOST = "kerberos.bench.example.test"
BOUND_HOST = "bound.bench.example.test"
PLAIN_HOST = "plain.bench.example.test"


def wrk(port: int, host: str, path: str, cookie: str, duration: int, conns: int) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "-H", f"Host: {host}:{port}",
                          "-H", f"Cookie: {cookie}", f"http://{HOST}:{port}{path}"],
                         capture_output=True, text=True, timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+\w+)", out).group(1)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p99": p99, "non2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else "", "raw": out}


def http_path(tmp: Path, realm: KerberosRealm, apache: NegotiateApache, duration: int, conns: int) -> dict:
    gw = Gateway(tmp / "gw")
    (tmp / "gw").mkdir()
    front = free_port()
    bases = {name: f"http://{host}:{front}" for name, host in (("kerberos", KERBEROS_HOST), ("plain", PLAIN_HOST),
                                                                ("bound", BOUND_HOST))}
    provider = OpenIDProvider(tmp / "idp", [f"{b}/.gateway/callback" for b in bases.values()],
                              [f"{b}/.gateway/signedout" for b in bases.values()])
    try:
        (tmp / "secret.txt").write_text(SECRET + "\n")
        svc = gw.service(start=False)
        internal = f"http://{HOST}:{apache.port}/"
        svc.add_front_door(front, [
            {"name": "kerberos", "external_url": bases["kerberos"] + "/", "internal_url": internal,
             "options": {"preauth": "oidc", "sso": "kerberos", "kerberos_spn": BACKEND}},
            {"name": "bound", "external_url": bases["bound"] + "/", "internal_url": internal,
             "options": {"preauth": "oidc", "sso": "kerberos", "kerberos_spn": BACKEND, "kerberos_preemptive": False}},
            {"name": "plain", "external_url": bases["plain"] + "/", "internal_url": internal,
             "options": {"preauth": "passthrough"}},
        ], more="\n" + toml_table("http.oidc", {"issuer": provider.issuer, "client_id": "gateway",
                                                "client_secret_file": str(tmp / "secret.txt")}))
        svc.start()
        conn = gw.connector(svc, start=False)
        with open(conn.config_path, "a") as f:
            f.write("\n" + toml_table("kerberos", {"keytab": str(realm.keytab(CONNECTOR)),
                                                   "principal": principal(CONNECTOR),
                                                   "krb5_conf": str(realm.krb5_conf)}))
        conn.start()
        wait_until(lambda: "oidc: provider" in svc.log(), 30, "the service to discover the provider")
        browser = Browser()
        page = sign_in(browser, bases["kerberos"] + "/private", "alice", provider)
        assert page.status == 200 and page.body == b"private\n", (page.status, page.text[:300])
        cookie = browser.cookie_header(KERBEROS_HOST, "/private")
        page = sign_in(browser, bases["bound"] + "/bound", "alice", provider)
        assert page.status == 200 and page.body == b"bound\n", (page.status, page.text[:300])
        bound_cookie = browser.cookie_header(BOUND_HOST, "/bound")
        results = {}
        for name, host, path, jar in (
                ("passthrough", PLAIN_HOST, "/open", cookie), ("kerberos", KERBEROS_HOST, "/private", cookie),
                ("kerberos, 401 challenge, connection-bound back end", BOUND_HOST, "/bound", bound_cookie),
                ("passthrough again", PLAIN_HOST, "/open", cookie)):
            wrk(front, host, path, jar, 2, conns)   # warm-up: connections, pools, the credential cache
            results[name] = wrk(front, host, path, jar, duration, conns)
        return results
    finally:
        provider.stop()
        gw.cleanup()


def cold_exchanges(realm: KerberosRealm, users: int, threads: int) -> dict:
    from gateway_kerberos_sso.delegation import Account, delegate

    names = [f"bench{i:04d}" for i in range(users)]
    realm._run(realm.programs["kadmin.local"], "-r", "EXAMPLE.TEST",
               stdin="".join(f"addprinc -randkey {n}\n" for n in names))
    account = Account(principal(CONNECTOR), str(realm.keytab(CONNECTOR)))
    delegate(account, principal("alice"), BACKEND)   # the account's TGT, as a running connector has it
    start = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        done = list(pool.map(lambda n: delegate(account, principal(n), BACKEND), names))
    elapsed = time.monotonic() - start
    assert len(done) == users and all(d.first.token for d in done)
    return {"users": users, "threads": threads, "seconds": elapsed, "per_second": users / elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--no-replay-cache", action="store_true",
                        help="Apache without its replay cache (one lock file all workers share), to see the gateway's own cost")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("bench/kerberos.py needs wrk", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="gwbench-krb."))
    os.chmod(tmp, 0o711)   # Apache's www-data workers traverse it
    realm = KerberosRealm(tmp / "kdc")
    for name in KRB5_VARIABLES:
        os.environ[name] = realm.env[name]
    apache = None
    try:
        apache = NegotiateApache(realm, BACKEND, tmp / "httpd", servers=args.conns + 2, debug=False,
                                 replay_cache=not args.no_replay_cache)
        http = http_path(tmp, realm, apache, args.duration, args.conns)
        cold = cold_exchanges(realm, args.users, args.threads)
    finally:
        if apache is not None:
            apache.stop()
        realm.stop()
    base = (http["passthrough"]["rps"] + http["passthrough again"]["rps"]) / 2
    ratio = http["kerberos"]["rps"] / base
    bound = http["kerberos, 401 challenge, connection-bound back end"]["rps"] / base
    print(f"## Kerberos SSO ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, wrk -t1 -c{args.conns}, "
          f"{args.duration} s)\n")
    print("| path | req/s | p99 | non-2xx | socket errors |\n|---|---|---|---|---|")
    for name, r in http.items():
        print(f"| {name} | {r['rps']:.0f} | {r['p99']} | {r['non2xx']} | {r['socket_errors'] or 'none'} |")
    print(f"\nkerberos / passthrough (mean of both passthrough runs): {ratio:.2f} "
          f"(target >= 0.8: {'PASS' if ratio >= 0.8 else 'MISS'}); with a connection-bound back end: {bound:.2f} "
          f"({'PASS' if bound >= 0.8 else 'MISS'})")
    print(f"\ncold cache: {cold['users']} distinct users, S4U2Self + S4U2Proxy each, {cold['threads']} threads: "
          f"{cold['seconds']:.1f} s, {cold['per_second']:.0f} exchanges/s")
    if args.keep:
        print(f"\nscratch directory kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
