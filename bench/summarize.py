#!/usr/bin/env python3
"""summarize.py RAW_DIR -- turn the raw files written by bench/run into Markdown.

Reads (all optional, per path P):
  meta.txt, status.tsv, P.failure.log,
  P.http_cN.wrk / .cpu     wrk --latency output, cpumon line
  P.iperf_up.json / _down  iperf3 -J output (+ .cpu, .err)
  P.curl.txt / .cpu        "code bytes seconds" per curl of the 256 MiB file
  gateway.idle.json        idle_streams.py result; gateway.rss_fresh ("label kB")
  httpLocaltunnel.sockets  tunnel sockets the localtunnel client had open
  httpGateway.profile.*    py-spy output of --profile (its top list is linked, not parsed)
HTTP app paths (http*, bench/http.sh) have wrk rows only; their ratios are to httpDirect and
their targets are the HTTP app path's (req/s, × localtunnel, p99 × ssh -R).
Prints tables (per test), the project's target ratios with PASS/MISS, CPU, and
failures. Pure stdlib; adapted from the project's shared recipes.
"""
import glob
import json
import os
import re
import sys

RAW = sys.argv[1]


def path_of(*parts):
    return os.path.join(RAW, *parts)


def read(name, default=None):
    try:
        with open(path_of(name)) as f:
            return f.read()
    except OSError:
        return default


meta = {}
for line in (read("meta.txt") or "").splitlines():
    k, _, v = line.partition("=")
    meta[k] = v
PATHS = meta.get("paths", "").split()
status = {}
for line in (read("status.tsv") or "").splitlines():
    p, st, msg = (line.split("\t") + ["", ""])[:3]
    status[p] = (st, msg)
conns_list = [int(c) for c in meta.get("conns", "50").split()]
HTTP_PATHS = [p for p in PATHS if p.startswith("http")]
TCP_PATHS = [p for p in PATHS if not p.startswith("http")]


# --- parsers ------------------------------------------------------------------
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", v or "")
    if not m:
        return None
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[m.group(2)]


def parse_wrk(text):
    if not text:
        return None
    r = {"rps": None, "p50": None, "p99": None, "errors": 0, "err_detail": []}
    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if m:
        r["rps"] = float(m.group(1))
    for pct, key in (("50%", "p50"), ("99%", "p99")):
        m = re.search(rf"^\s+{pct}\s+(\S+)", text, re.M)
        if m:
            r[key] = ms(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        c, rd, w, t = map(int, m.groups())
        r["errors"] += c + rd + w + t
        r["err_detail"].append(f"sock c{c}/r{rd}/w{w}/t{t}")
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        r["errors"] += int(m.group(1))
        r["err_detail"].append(f"non-2xx {m.group(1)}")
    if r["rps"] is None:
        first = text.strip().splitlines()[-1] if text.strip() else "no output"
        r["err_detail"].append(f"wrk: {first[:60]}")
    return r


def parse_iperf(name):
    text = read(name)
    if not text:
        return None, "no output"
    try:
        d = json.loads(text)
    except ValueError:
        return None, (text.strip().splitlines() or ["bad json"])[-1][:80]
    if "error" in d:
        return None, d["error"][:80]
    try:
        return d["end"]["sum_received"]["bits_per_second"] / 1e9, None
    except (KeyError, TypeError):
        return None, "no result in JSON"


def parse_curl(name):
    text = read(name)
    if not text:
        return None, "no output"
    b = t = 0.0
    n = bad = 0
    for line in text.splitlines():
        f = line.split()
        if len(f) != 3:
            continue
        n += 1
        if f[0] == "200" and float(f[1]) == 256 * 1024 * 1024:
            b += float(f[1]); t += float(f[2])
        else:
            bad += 1
    note = f"{n} run(s)" + (f", {bad} failed/short" if bad else "")
    return (b * 8 / t / 1e9 if t > 0 else None), note


def cpu(name):
    text = (read(name) or "").strip()
    return text[5:] if text.startswith("cpu: ") else ""


NOISY = 30.0   # % of a core of foreign CPU ("other=") during a measurement


def noisy(name):
    m = re.search(r"other=(-?[\d.]+)%", read(name) or "")
    return bool(m) and float(m.group(1)) > NOISY


def mark(text, name):
    return text + " ⚠" if noisy(name) else text


def fmt(v, nd=2):
    return "n/a" if v is None else f"{v:,.{nd}f}"


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


# --- collect ------------------------------------------------------------------
http = {}   # (path, conns) -> parsed wrk
bulk = {}   # (path, test) -> (gbps, note)
for p in PATHS:
    for c in conns_list:
        w = parse_wrk(read(f"{p}.http_c{c}.wrk"))
        if w:
            http[p, c] = w
    for d in ("up", "down"):
        if os.path.exists(path_of(f"{p}.iperf_{d}.json")):
            bulk[p, f"iperf_{d}"] = parse_iperf(f"{p}.iperf_{d}.json")
    if os.path.exists(path_of(f"{p}.curl.txt")):
        bulk[p, "curl"] = parse_curl(f"{p}.curl.txt")

out = []
say = out.append
q = meta.get("quick") == "1"
say(f"# gateway loopback bench — {meta.get('date', '?')}\n")
say(f"{'QUICK smoke run' if q else 'Full run'}: {meta.get('duration')} s per measurement; "
    f"git {meta.get('git', '?')}; {meta.get('cpus', '?')} CPUs; kernel {meta.get('kernel', '?')}; "
    f"RLIMIT_NOFILE {meta.get('nofile', '?')}.  ")
say(f"Tools: {meta.get('versions', '?')}.  ")
if meta.get("src"):
    say(f"**Service and connector run from another source tree**: {meta['src']}.  ")
if meta.get("node_versions"):
    say(f"localtunnel: {meta['node_versions']}.  ")
assh_cipher = (read("asshR.cipher") or "").strip()
say("sshR = `ssh -N -R` (Nagle on) and sshRnd = `ssh -tt -R … sleep` (OpenSSH sets TCP_NODELAY) use "
    "OpenSSH's default cipher, chacha20-poly1305, as the targets' `ssh -R`; sshRaes is sshRnd with "
    f"`-c {meta.get('ssh_cipher', '?')}`, the AES-GCM our tunnel negotiates (reference rows, stricter)."
    + (f" asshR (asyncssh, default negotiation as in the recipe) uses `{assh_cipher}`." if assh_cipher else ""))
say("All traffic on 127.0.0.1; nginx 1 worker; client, tunnel ends and backend share the same cores, "
    "so numbers are for ratios on this box, not absolute capacity.\n")

say("## Paths\n")
say("| path | status | note |")
say("|---|---|---|")
for p in PATHS:
    st, msg = status.get(p, ("not run", ""))
    say(f"| {p} | {'**FAILED**' if st in ('failed', 'died') else st} | {msg} |")

say(f"\n## HTTP keep-alive, GET 1 KiB (wrk -t1 -cN -d{meta.get('duration')}s --latency)\n")
say("HTTP app paths (http*) send the Host their router needs; their × direct is to httpDirect.\n")
say("| path | conns | req/s | p50 ms | p99 ms | errors | × direct |")
say("|---|---|---|---|---|---|---|")
for c in conns_list:
    for p in PATHS:
        w = http.get((p, c))
        if not w:
            if status.get(p, ("",))[0] != "ok":
                say(f"| {p} | {c} | failed | | | | |")
            continue
        base = http.get(("httpDirect" if p.startswith("http") else "direct", c), {}).get("rps")
        err = str(w["errors"]) + (f" ({'; '.join(w['err_detail'])})" if w["err_detail"] and w["errors"] else "")
        if w["rps"] is None:
            err = "; ".join(w["err_detail"])
        say(f"| {p} | {c} | {mark(fmt(w['rps'], 0), f'{p}.http_c{c}.cpu')} | {fmt(w['p50'])} | {fmt(w['p99'])} | {err} | "
            f"{fmt(ratio(w['rps'], base))} |")

if TCP_PATHS:
    say(f"\n## Bulk, single TCP stream, Gbit/s ({meta.get('duration')} s each)\n")
    say("iperf3 up = client→backend, down = `-R` backend→client; curl = GET of a 256 MiB file to /dev/null "
        "(bytes/time over repeated downloads).\n")
    say("| path | iperf3 up | × direct | iperf3 down | × direct | curl 256 MiB | × direct | notes |")
    say("|---|---|---|---|---|---|---|---|")
for p in TCP_PATHS:
    if not any((p, t) in bulk for t in ("iperf_up", "iperf_down", "curl")):
        if status.get(p, ("",))[0] != "ok":
            say(f"| {p} | failed | | | | | | |")
        continue
    cells, notes = [], []
    for t in ("iperf_up", "iperf_down", "curl"):
        g, note = bulk.get((p, t), (None, "not run"))
        base = bulk.get(("direct", t), (None, None))[0]
        cells += [mark(fmt(g), f"{p}.{t}.cpu"), fmt(ratio(g, base))]
        if note and (t == "curl" or g is None):
            notes.append(f"{t}: {note}")
    say(f"| {p} | " + " | ".join(cells) + f" | {'; '.join(notes)} |")

say(f"\n⚠ = more than {NOISY:.0f}% of a core of foreign CPU load on the box during that "
    "measurement (see `other=` in the CPU table): treat it as noisy; rerun if it matters.")

# --- idle streams -------------------------------------------------------------
def load_idle(p):
    text = read(f"{p}.idle.json")
    if text:
        try:
            return json.loads(text)
        except ValueError:
            return {"error": text[:200]}
    if os.path.exists(path_of(f"{p}.idle.rc")):
        return {"error": f"idle_streams.py exited {(read(f'{p}.idle.rc') or '').strip()}: "
                         f"{(read(f'{p}.idle.err') or '').strip()[-300:]}"}
    return None


idle_rss = {}   # gateway: label -> MiB with N idle streams (None if not valid)
for p in PATHS:
    idle = load_idle(p)
    if idle is None:
        continue
    fresh = {}
    for line in (read(f"{p}.rss_fresh") or "").splitlines():
        f = line.split()
        if len(f) == 2 and f[1].isdigit():
            fresh[f[0]] = int(f[1]) / 1024
    say(f"\n## Idle streams through {p}\n")
    if "error" in idle:
        say(f"idle measurement failed: {idle['error']}")
        continue
    be = idle.get("backend_established") or {}
    say(f"Requested {idle['requested']} connections to the app port (in batches; one keep-alive "
        f"GET each, then idle): **{idle['ok']} ok**, {idle['failed']} failed, "
        f"{idle['not_attempted']} not attempted, opened in {idle['open_seconds']} s; "
        f"{idle['still_open_client_side']} still open after settling; "
        f"ESTABLISHED sockets to nginx (tunnel side): {be.get('to_port', 'n/a')}. "
        f"Client RLIMIT_NOFILE {idle['nofile_soft']}.\n")
    if idle.get("errors"):
        say("Errors: " + "; ".join(f"{k} ×{v}" for k, v in idle["errors"].items()) + "\n")
    say("| process (tree) | RSS fresh MiB | RSS before idle MiB | RSS with idle streams MiB | peak (VmHWM) MiB | KiB per stream |")
    say("|---|---|---|---|---|---|")
    for k in idle["rss_before"]:
        b = idle["rss_before"].get(k, {}).get("VmRSS")
        a = idle["rss_with_streams"].get(k, {}).get("VmRSS")
        h = idle["rss_with_streams"].get(k, {}).get("VmHWM")
        per = (a - b) * 1024 / idle["ok"] if a is not None and b is not None and idle["ok"] else None
        if p == "gateway":
            idle_rss[k] = a if idle["ok"] == idle["requested"] else None
        say(f"| {k} | {fmt(fresh.get(k), 1)} | {fmt(b, 1)} | {fmt(a, 1)} | {fmt(h, 1)} | {fmt(per, 1)} |")
    if idle["ok"] < idle["requested"]:
        say(f"\n(not all {idle['requested']} streams were established: RSS target not evaluated)")

# --- HTTP app path ------------------------------------------------------------
def rps(p, c):
    return http.get((p, c), {}).get("rps")


def p99(p, c):
    return http.get((p, c), {}).get("p99")


if "httpGateway" in PATHS:
    say("\n## HTTP app path: ours against nginx, `ssh -R` and localtunnel\n")
    say("ours = httpGateway (front door + connector, passthrough web app); lt = httpLocaltunnel; "
        "ssh -R = httpSshR (`ssh -N -R`, OpenSSH defaults, Nagle on); sshRnd = httpSshRnd "
        "(`ssh -tt -R`, TCP_NODELAY), a stricter reference.\n")
    say("| conns | ours req/s | lt req/s | ours ÷ lt | ssh -R req/s | ours p50 ms | ours p99 ms | ssh -R p99 ms "
        "| lt p99 ms | ours p99 ÷ ssh -R p99 | ours p99 ÷ sshRnd p99 | ours ÷ nginx req/s |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in conns_list:
        g = http.get(("httpGateway", c), {})
        say(f"| {c} | {fmt(g.get('rps'), 0)} | {fmt(rps('httpLocaltunnel', c), 0)} "
            f"| {fmt(ratio(g.get('rps'), rps('httpLocaltunnel', c)))} | {fmt(rps('httpSshR', c), 0)} "
            f"| {fmt(g.get('p50'))} | {fmt(g.get('p99'))} | {fmt(p99('httpSshR', c))} | {fmt(p99('httpLocaltunnel', c))} "
            f"| {fmt(ratio(g.get('p99'), p99('httpSshR', c)))} | {fmt(ratio(g.get('p99'), p99('httpSshRnd', c)))} "
            f"| {fmt(ratio(g.get('rps'), rps('httpDirect', c)))} |")
    socks = (read("httpLocaltunnel.sockets") or "").strip()
    if socks:
        say(f"\nThe localtunnel client had {socks} tunnel sockets open (its server's default and cap is 10).")
    tops = [f for f in ("httpGateway.profile.service.top.txt", "httpGateway.profile.connector.top.txt")
            if os.path.exists(path_of(f))]
    if tops:
        prof = parse_wrk(read("httpGateway.profile.wrk")) or {}
        say(f"\nProfiled run (--profile, py-spy at 200 Hz, not in the table above): "
            f"{fmt(prof.get('rps'), 0)} req/s; top lists in " + ", ".join(f"`{f}`" for f in tops) + ".")

# --- targets ------------------------------------------------------------------
say("\n## Targets\n")
say("| target | measured | goal | result |")
say("|---|---|---|---|")


def target(name, value, goal, ok, nd=2, inputs=()):
    res = "n/a" if value is None else ("PASS" if ok(value) else "**MISS**")
    if value is not None and any(noisy(f) for f in inputs):
        res += " (noisy ⚠)"
    say(f"| {name} | {fmt(value, nd)} | {goal} | {res} |")


if TCP_PATHS:
    for c in conns_list:
        target(f"gateway req/s ÷ asshR req/s (c{c})", ratio(rps("gateway", c), rps("asshR", c)), "≥ 3",
               lambda v: v >= 3, inputs=(f"gateway.http_c{c}.cpu", f"asshR.http_c{c}.cpu"))
    for c in conns_list:
        target(f"gateway req/s ÷ sshRnd req/s (c{c})", ratio(rps("gateway", c), rps("sshRnd", c)), "≥ 0.35",
               lambda v: v >= 0.35, inputs=(f"gateway.http_c{c}.cpu", f"sshRnd.http_c{c}.cpu"))
    names = {"iperf_up": "iperf3 up", "iperf_down": "iperf3 down", "curl": "curl 256 MiB"}
    for t, n in names.items():
        target(f"gateway bulk ÷ sshRnd bulk ({n})", ratio(bulk.get(("gateway", t), (None,))[0],
                                                          bulk.get(("sshRnd", t), (None,))[0]), "≥ 1.0",
               lambda v: v >= 1.0, inputs=(f"gateway.{t}.cpu", f"sshRnd.{t}.cpu"))
    for t, n in names.items():
        target(f"gateway bulk ÷ sshRaes bulk ({n})", ratio(bulk.get(("gateway", t), (None,))[0],
                                                           bulk.get(("sshRaes", t), (None,))[0]), "≥ 1.0 (reference)",
               lambda v: v >= 1.0, inputs=(f"gateway.{t}.cpu", f"sshRaes.{t}.cpu"))
    for t, n in names.items():
        target(f"gateway bulk Gbit/s ({n})", bulk.get(("gateway", t), (None,))[0], "≥ 2",
               lambda v: v >= 2, inputs=(f"gateway.{t}.cpu",))
    for c in conns_list:
        target(f"gateway req/s ÷ sshRaes req/s (c{c})", ratio(rps("gateway", c), rps("sshRaes", c)), "≥ 0.35 (reference)",
               lambda v: v >= 0.35, inputs=(f"gateway.http_c{c}.cpu", f"sshRaes.http_c{c}.cpu"))
    for c in conns_list:
        target(f"gateway p99 ÷ sshRnd p99 (c{c})", ratio(p99("gateway", c), p99("sshRnd", c)), "≤ 3",
               lambda v: v <= 3, inputs=(f"gateway.http_c{c}.cpu", f"sshRnd.http_c{c}.cpu"))
    # Private Access (issue #10): the user's client hop must be cheap next to the TCP app path
    if "access" in TCP_PATHS:
        for c in conns_list:
            target(f"access req/s ÷ gateway req/s (c{c})", ratio(rps("access", c), rps("gateway", c)), "≥ 0.8",
                   lambda v: v >= 0.8, inputs=(f"access.http_c{c}.cpu", f"gateway.http_c{c}.cpu"))
            target(f"access req/s ÷ sshLR req/s (c{c})", ratio(rps("access", c), rps("sshLR", c)), "reference",
                   lambda v: True, inputs=(f"access.http_c{c}.cpu", f"sshLR.http_c{c}.cpu"))
        for t, n in names.items():
            target(f"access bulk ÷ gateway bulk ({n})", ratio(bulk.get(("access", t), (None,))[0],
                                                              bulk.get(("gateway", t), (None,))[0]), "≥ 0.9",
                   lambda v: v >= 0.9, inputs=(f"access.{t}.cpu", f"gateway.{t}.cpu"))
            target(f"access bulk ÷ sshLR bulk ({n})", ratio(bulk.get(("access", t), (None,))[0],
                                                            bulk.get(("sshLR", t), (None,))[0]), "reference",
                   lambda v: True, inputs=(f"access.{t}.cpu", f"sshLR.{t}.cpu"))
    if meta.get("idle", "0") != "0":
        n = meta.get("idle")
        for k in ("service", "connector"):
            target(f"{k} RSS MiB with {n} idle streams", idle_rss.get(k), "< 500", lambda v: v < 500, 1)
        both = None if None in (idle_rss.get("service"), idle_rss.get("connector")) \
            else idle_rss["service"] + idle_rss["connector"]
        target(f"service + connector RSS MiB ({n} idle streams)", both, "< 500 (stricter)", lambda v: v < 500, 1)

if HTTP_PATHS:
    # the HTTP app path's targets (issue #3): ours = httpGateway; ssh -R = httpSshR
    for c in conns_list:
        target(f"httpGateway req/s (c{c})", rps("httpGateway", c), "≥ 3,000",
               lambda v: v >= 3000, 0, inputs=(f"httpGateway.http_c{c}.cpu",))
    for c in conns_list:
        target(f"httpGateway req/s ÷ httpLocaltunnel req/s (c{c})",
               ratio(rps("httpGateway", c), rps("httpLocaltunnel", c)), "≥ 1.7", lambda v: v >= 1.7,
               inputs=(f"httpGateway.http_c{c}.cpu", f"httpLocaltunnel.http_c{c}.cpu"))
    for c in conns_list:
        target(f"httpGateway p99 ÷ httpSshR p99 (c{c})", ratio(p99("httpGateway", c), p99("httpSshR", c)),
               "≤ 2", lambda v: v <= 2, inputs=(f"httpGateway.http_c{c}.cpu", f"httpSshR.http_c{c}.cpu"))
    for c in conns_list:
        target(f"httpGateway p99 ÷ httpSshRnd p99 (c{c})", ratio(p99("httpGateway", c), p99("httpSshRnd", c)),
               "≤ 2 (reference: ssh -R with TCP_NODELAY)", lambda v: v <= 2,
               inputs=(f"httpGateway.http_c{c}.cpu", f"httpSshRnd.http_c{c}.cpu"))

# --- CPU ----------------------------------------------------------------------
rows = []
for p in PATHS:
    for c in conns_list:
        if cpu(f"{p}.http_c{c}.cpu"):
            rows.append((p, f"wrk c{c}", cpu(f"{p}.http_c{c}.cpu")))
    for t in ("iperf_up", "iperf_down", "curl"):
        if cpu(f"{p}.{t}.cpu"):
            rows.append((p, t, cpu(f"{p}.{t}.cpu")))
if rows:
    say("\n## CPU during each measurement (% of one core per process tree; "
        "machine = whole box; other = busy CPU outside these processes, i.e. noise)\n")
    say("| path | test | CPU |")
    say("|---|---|---|")
    for r in rows:
        say(f"| {r[0]} | {r[1]} | {r[2]} |")

# --- failures -----------------------------------------------------------------
fails = [p for p in PATHS if status.get(p, ("",))[0] in ("failed", "died")]
if fails:
    say("\n## Failures\n")
    for p in fails:
        say(f"**{p}**: {status[p][1]}\n")
        log = (read(f"{p}.failure.log") or "").rstrip()
        if log:
            say("```\n" + log + "\n```\n")

print("\n".join(out))
