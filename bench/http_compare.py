#!/usr/bin/env python3
"""HTTP reverse-proxy benchmark: wrk (HTTP/1.1 keep-alive) -> proxy -> nginx origin serving a
6-byte response and a 16 KiB file. Proxies: ringside `forward --protocol http` (the L7 path),
nginx `proxy_pass` with an upstream keep-alive pool, HAProxy `mode http` with connection reuse;
one worker/thread each. Interleaved rounds, medians of requests/s and latency p50/p99, ratios to
the direct path; report in perf-reports/.
Usage: bench/http-compare.sh [--rounds N] [--seconds S] [--connections C]
"""

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import l4_compare as l4  # noqa: E402
import proxy_profile as prof  # noqa: E402

ROOT = l4.ROOT
RINGSIDE = os.path.join(ROOT, "target/release/ringside")
BENCH = os.path.join(ROOT, "target/release/ringside-bench")
FILES = {"small": b"hello\n", "16k": bytes((i * 7) % 251 for i in range(16384))}


def nginx_conf(work, name, body):
    prefix = os.path.join(work, name)
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write("user root;\nworker_processes 1;\ndaemon off;\nmaster_process on;\n"
                f"pid {prefix}/nginx.pid;\nerror_log stderr;\n"
                "events { worker_connections 4096; }\n"
                "http {\n  access_log off;\n  keepalive_requests 1000000;\n"
                f"  client_body_temp_path {prefix}/body;\n  proxy_temp_path {prefix}/proxy;\n"
                f"  fastcgi_temp_path {prefix}/fcgi;\n  uwsgi_temp_path {prefix}/uwsgi;\n  scgi_temp_path {prefix}/scgi;\n"
                + body + "}\n")
    return ["nginx", "-p", prefix, "-c", conf]


def to_us(v):
    m = re.match(r"([\d.]+)(us|ms|s)$", v)
    n, u = float(m.group(1)), m.group(2)
    return n * {"us": 1, "ms": 1000, "s": 1e6}[u]


def wrk(url, seconds, connections):
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = to_us(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = to_us(re.search(r"\s99%\s+(\S+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if non2xx or errors:
        raise RuntimeError(f"wrk saw failures on {url}:\n{out}")
    return rps, p50, p99


TESTS = [("small_rps", "6 B: requests/s", True), ("small_p50", "6 B: p50 µs", False), ("small_p99", "6 B: p99 µs", False),
         ("16k_rps", "16 KiB: requests/s", True), ("16k_p50", "16 KiB: p50 µs", False), ("16k_p99", "16 KiB: p99 µs", False)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(ROOT, "perf-reports"))
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="ringside-httpbench-")
    procs = l4.Procs()
    results = {}
    try:
        www = os.path.join(work, "www")
        os.makedirs(www)
        for n, b in FILES.items():
            with open(os.path.join(www, n), "wb") as f:
                f.write(b)
        origin = l4.free_port()
        procs.start(nginx_conf(work, "origin", f"  server {{\n    listen 127.0.0.1:{origin};\n    root {www};\n  }}\n"),
                    stderr=open(os.path.join(work, "origin.log"), "w"))
        peers = {"direct": origin}
        pids = {}
        p = l4.free_port()
        r = procs.start([RINGSIDE, "forward", f"127.0.0.1:{p}", f"127.0.0.1:{origin}", "--protocol", "http",
                         "--workers", "1", "--l7-threads", "1"], stderr=open(os.path.join(work, "ringside.log"), "w"))
        peers["ringside"] = p
        pids["ringside"] = r.pid
        p = l4.free_port()
        n = procs.start(nginx_conf(work, "proxy",
                                   f"  upstream origin {{\n    server 127.0.0.1:{origin};\n    keepalive 64;\n  }}\n"
                                   f"  server {{\n    listen 127.0.0.1:{p};\n    location / {{\n      proxy_pass http://origin;\n"
                                   "      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }\n  }\n"),
                        stderr=open(os.path.join(work, "nginx-proxy.log"), "w"))
        peers["nginx"] = p
        pids["nginx"] = n.pid
        p = l4.free_port()
        hcfg = os.path.join(work, "haproxy.cfg")
        with open(hcfg, "w") as f:
            f.write("global\n  nbthread 1\n  maxconn 5000\n\ndefaults\n  mode http\n  option http-keep-alive\n"
                    "  http-reuse always\n  timeout connect 5s\n  timeout client 1m\n  timeout server 1m\n\n"
                    f"listen web\n  bind 127.0.0.1:{p}\n  server origin 127.0.0.1:{origin}\n")
        h = procs.start(["haproxy", "-f", hcfg, "-db"], stderr=open(hcfg + ".log", "w"))
        peers["haproxy"] = p
        pids["haproxy"] = h.pid
                # mTLS pairs: client -> proxy A -> mTLS (TLS 1.3, client certificates, chains verified)
        # -> proxy B -> origin.
        certs = os.path.join(work, "certs")
        subprocess.run([BENCH, "gen-certs", "--out", certs, "frontend", "backend"], check=True,
                       stdout=subprocess.DEVNULL)
        c = lambda n: os.path.join(certs, n)  # noqa: E731
        tport, oport = l4.free_port(), l4.free_port()
        t = procs.start([RINGSIDE, "forward", f"127.0.0.1:{tport}", f"127.0.0.1:{origin}", "--protocol", "http",
                         "--workers", "1", "--l7-threads", "1", "--tls-terminate", "--cert", c("backend.crt"),
                         "--key", c("backend.key"), "--ca", c("ca.pem"),
                         "--allow-id", "spiffe://dc1/ns/default/sa/frontend"],
                        stderr=open(os.path.join(work, "ringside-term.log"), "w"))
        o = procs.start([RINGSIDE, "forward", f"127.0.0.1:{oport}", f"127.0.0.1:{tport}", "--protocol", "http",
                         "--workers", "1", "--l7-threads", "1", "--tls-origin", "--cert", c("frontend.crt"),
                         "--key", c("frontend.key"), "--ca", c("ca.pem"),
                         "--expect-id", "spiffe://dc1/ns/default/sa/backend"],
                        stderr=open(os.path.join(work, "ringside-orig.log"), "w"))
        peers["ringside-mtls"] = oport
        pids["ringside-mtls"] = [t.pid, o.pid]
        htport, hoport = l4.free_port(), l4.free_port()
        common = ("global\n  nbthread 1\n  maxconn 5000\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n"
                  "  ssl-default-server-options ssl-min-ver TLSv1.3\n\ndefaults\n  mode http\n  option http-keep-alive\n"
                  "  http-reuse always\n  timeout connect 5s\n  timeout client 1m\n  timeout server 1m\n\n")
        ht_cfg, ho_cfg = os.path.join(work, "hap-term.cfg"), os.path.join(work, "hap-orig.cfg")
        with open(ht_cfg, "w") as f:
            f.write(common + f"listen web\n  bind 127.0.0.1:{htport} ssl crt {c('backend.pem')} ca-file {c('ca.pem')} verify required\n"
                    f"  server origin 127.0.0.1:{origin}\n")
        with open(ho_cfg, "w") as f:
            f.write(common + f"listen web\n  bind 127.0.0.1:{hoport}\n"
                    f"  server t 127.0.0.1:{htport} ssl crt {c('frontend.pem')} ca-file {c('ca.pem')} verify required\n")
        ht = procs.start(["haproxy", "-f", ht_cfg, "-db"], stderr=open(ht_cfg + ".log", "w"))
        ho = procs.start(["haproxy", "-f", ho_cfg, "-db"], stderr=open(ho_cfg + ".log", "w"))
        peers["haproxy-mtls"] = hoport
        pids["haproxy-mtls"] = [ht.pid, ho.pid]
        for port in peers.values():
            l4.wait_port(port)
        time.sleep(0.5)
        rss = lambda v: sum(l4.rss_kib(x) for x in v) if isinstance(v, list) else l4.rss_kib(v)  # noqa: E731
        idle_rss = {k: rss(v) for k, v in pids.items()}
        order = list(peers)
        for rnd in range(args.rounds):
            for peer in order:
                port = peers[peer]
                res = results.setdefault(peer, {k: [] for k, _, _ in TESTS})
                for name in FILES:
                    rps, p50, p99 = wrk(f"http://127.0.0.1:{port}/{name}", args.seconds, args.connections)
                    res[f"{name}_rps"].append(rps)
                    res[f"{name}_p50"].append(p50)
                    res[f"{name}_p99"].append(p99)
                print(f"round {rnd + 1}/{args.rounds} {peer:9s} " +
                      " ".join(f"{k}={v[-1]:.0f}" for k, v in res.items()), flush=True)
            order = order[1:] + order[:1]
        loaded_rss = {k: rss(v) for k, v in pids.items()}
        profiles = {}
        small = list(FILES)[0]
        for peer, pid in pids.items():
            ps = pid if isinstance(pid, list) else [pid]
            profiles[peer] = prof.http_profile(ps, f"http://127.0.0.1:{peers[peer]}/{small}", args.seconds, wrk)
            print(f"profile {peer}: {profiles[peer]}", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)

    med = {p: {k: statistics.median(v) for k, v in res.items()} for p, res in results.items()}
    d = med["direct"]
    lines = ["| path | " + " | ".join(label for _, label, _ in TESTS) + " |", "|" + "---|" * (len(TESTS) + 1)]
    for p in results:
        cells = [f"{med[p][k]:.0f}" + (f" ({med[p][k] / d[k]:.2f}x)" if p != "direct" else "") for k, _, _ in TESTS]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    today = datetime.date.today().isoformat()
    path = os.path.join(args.out, f"{today}-http.md")
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open(path, "w") as f:
        f.write(f"# HTTP reverse proxy: ringside L7 path vs nginx proxy_pass vs HAProxy mode http ({today})\n\n")
        f.write(f"ringside commit `{git}`; {args.rounds} interleaved rounds of {args.seconds} s per test; medians, "
                f"ratio to the direct path in parentheses. wrk -t2 -c{args.connections}, HTTP/1.1 keep-alive, on loopback, "
                "to an nginx origin (1 worker) serving a 6-byte response and a 16 KiB file. Each proxy runs one "
                "worker/thread and keeps upstream connections alive. The -mtls rows are pairs: client -> proxy A -> "
                "mTLS (TLS 1.3, client certificates, chains verified) -> proxy B -> origin (ringside: forward "
                "--protocol http --tls-origin / --tls-terminate; HAProxy: ssl crt/ca-file/verify required on both sides); "
                "their RSS is both proxies together.\n\n")
        f.write(table + "\n\n")
        f.write("RSS (KiB): " + ", ".join(f"{p} idle {idle_rss[p]} / after the run {loaded_rss[p]}" for p in idle_rss) + "\n\n")
        f.write("## Profile\n\n" + prof.HTTP_PROFILE_NOTE + "\n\n" + prof.http_table(profiles) + "\n\n")
        f.write("Raw values per round:\n\n```\n" + json.dumps(results, indent=1) + "\n```\n\n")
        f.write("## Machine\n\n" + l4.machine() + "\n\n")
        f.write("## Commands\n\n```\n"
                f"bench/http-compare.sh --rounds {args.rounds} --seconds {args.seconds} --connections {args.connections}\n"
                f"wrk -t2 -c{args.connections} -d{args.seconds}s --latency http://127.0.0.1:PORT/small|/16k\n"
                "ringside forward 127.0.0.1:P 127.0.0.1:ORIGIN --protocol http --workers 1 --l7-threads 1\n"
                "nginx: worker_processes 1; upstream keepalive 64; proxy_http_version 1.1; proxy_set_header Connection \"\"\n"
                "haproxy: nbthread 1; mode http; option http-keep-alive; http-reuse always\n```\n")
    print(f"report: {path}")


if __name__ == "__main__":
    sys.exit(main())
