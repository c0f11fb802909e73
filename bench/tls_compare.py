#!/usr/bin/env python3
"""mTLS pair benchmark: two ringside proxies doing mesh mTLS between them (tunnel mode: origin ->
terminate) vs two HAProxy instances doing mutual TLS 1.3 between them, vs the direct path.

Targets: iperf3 (1 and 4 streams), sockperf ping-pong (p50, p99), pgbench -S, and new connections
per second through the pair (connect, one byte each way, close), with TLS session resumption and with full handshakes.
Interleaved rounds, medians, ratios to direct; report in perf-reports/.
Usage: bench/tls-compare.sh [--rounds N] [--seconds S] [--baseline BINARY] [--baseline-args ARGS]
"""

import argparse
import datetime
import json
import os
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
BENCH = os.path.join(ROOT, "target/release/ringside-bench")
RINGSIDE = os.path.join(ROOT, "target/release/ringside")

TESTS = l4.TESTS + [("connrate", "new connections/s", True),
                    ("connrate_full", "new connections/s, full handshakes", True)]


def connrate(port, seconds):
    out = subprocess.run([BENCH, "connrate", "--addr", f"127.0.0.1:{port}", "--concurrency", "4",
                          "--duration", f"{seconds}s", "--json"], capture_output=True, text=True, timeout=seconds + 30)
    return json.loads(out.stdout)["connections_per_sec"]


def start_ringside_pair(procs, work, name, binary, targets, certs, extra=()):
    """Two ringside proxies: origin (client side) -> mesh mTLS -> terminate -> targets."""
    term_ports = {t: l4.free_port() for t in targets}
    orig_ports = {t: l4.free_port() for t in targets}
    c = lambda n: os.path.join(certs, n)  # noqa: E731
    term_yaml = os.path.join(work, f"{name}-term.yaml")
    orig_yaml = os.path.join(work, f"{name}-orig.yaml")
    with open(term_yaml, "w") as f:
        f.write("proxy:\n  workers: 1\nlisteners:\n")
        for t in targets:
            f.write(f"  - address: 127.0.0.1:{term_ports[t]}\n    service: {t}\n    tls:\n      mode: terminate\n"
                    f"      cert: {c('backend.crt')}\n      key: {c('backend.key')}\n      ca: {c('ca.pem')}\n"
                    "      allow_ids: [\"spiffe://dc1/ns/default/sa/frontend\"]\n")
        f.write("services:\n")
        for t, p in targets.items():
            f.write(f"  - name: {t}\n    endpoints: [\"127.0.0.1:{p}\"]\n")
    with open(orig_yaml, "w") as f:
        f.write("proxy:\n  workers: 1\nlisteners:\n")
        for t in targets:
            f.write(f"  - address: 127.0.0.1:{orig_ports[t]}\n    service: {t}\n    tls:\n      mode: origin\n"
                    f"      cert: {c('frontend.crt')}\n      key: {c('frontend.key')}\n      ca: {c('ca.pem')}\n"
                    "      expect_id: spiffe://dc1/ns/default/sa/backend\n")
            if t == "echofull":
                f.write("      resumption: false\n")
        f.write("services:\n")
        for t in targets:
            f.write(f"  - name: {t}\n    endpoints: [\"127.0.0.1:{term_ports[t]}\"]\n")
    pt = procs.start([binary, "run", "--config", term_yaml, *extra], stderr=open(term_yaml + ".log", "w"))
    po = procs.start([binary, "run", "--config", orig_yaml, *extra], stderr=open(orig_yaml + ".log", "w"))
    return orig_ports, [pt.pid, po.pid]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "perf-reports"))
    ap.add_argument("--baseline", help="another ringside binary run as a second pair (A/B in one run)")
    ap.add_argument("--baseline-args", default="",
                    help="extra `ringside run` arguments for the baseline pair (with no --baseline: this build), "
                         "e.g. '--idle-spin 0s' to measure a setting against the default")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="ringside-tlsbench-")
    procs = l4.Procs()
    results = {}
    try:
        certs = os.path.join(work, "certs")
        subprocess.run([BENCH, "gen-certs", "--out", certs, "frontend", "backend"], check=True)
        targets = {"iperf3": l4.free_port(), "sockperf": l4.free_port(), "pg": l4.free_port(), "echo": l4.free_port()}
        procs.start(["iperf3", "-s", "-p", str(targets["iperf3"])])
        procs.start(["sockperf", "server", "--tcp", "-i", "127.0.0.1", "-p", str(targets["sockperf"])])
        procs.start([BENCH, "echo", "--listen", f"127.0.0.1:{targets['echo']}"])
        # The same echo server behind listeners that never resume a TLS session.
        targets["echofull"] = targets["echo"]
        l4.start_postgres(procs, work, targets["pg"])

        peers = {"direct": dict(targets)}
        pids = {}
        # ringside pair: origin (client side) -> terminate (server side) -> target. With --baseline, a
        # second pair runs another build the same way, for an A/B comparison in the same run.
        baseline = args.baseline or (RINGSIDE if args.baseline_args else None)
        builds = [("ringside-mtls", RINGSIDE, [])] + (
            [("ringside-baseline", baseline, args.baseline_args.split())] if baseline else [])
        for name, binary, extra in builds:
            ports, ps = start_ringside_pair(procs, work, name, binary, targets, certs, extra)
            peers[name] = ports
            pids[name] = ps

        c = lambda n: os.path.join(certs, n)  # noqa: E731
        # HAProxy pair: mutual TLS 1.3 between the two instances, chain verification required.
        hterm = {t: l4.free_port() for t in targets}
        horig = {t: l4.free_port() for t in targets}
        conf_t = os.path.join(work, "hap-term.cfg")
        conf_o = os.path.join(work, "hap-orig.cfg")
        common = ("global\n  nbthread 1\n  maxconn 7000\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n"
                  "  ssl-default-server-options ssl-min-ver TLSv1.3\n\ndefaults\n  mode tcp\n  option splice-auto\n"
                  "  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\n")
        with open(conf_t, "w") as f:
            f.write(common)
            for t, p in targets.items():
                f.write(f"listen {t}\n  bind 127.0.0.1:{hterm[t]} ssl crt {c('backend.pem')} ca-file {c('ca.pem')} verify required\n"
                        f"  server s 127.0.0.1:{p}\n\n")
        with open(conf_o, "w") as f:
            f.write(common)
            for t in targets:
                f.write(f"listen {t}\n  bind 127.0.0.1:{horig[t]}\n"
                        f"  server s 127.0.0.1:{hterm[t]} ssl crt {c('frontend.pem')} ca-file {c('ca.pem')} verify required"
                        + (" no-ssl-reuse" if t == "echofull" else "") + "\n\n")
        ht = procs.start(["haproxy", "-f", conf_t, "-db"], stderr=open(conf_t + ".log", "w"))
        ho = procs.start(["haproxy", "-f", conf_o, "-db"], stderr=open(conf_o + ".log", "w"))
        peers["haproxy-mtls"] = horig
        pids["haproxy-mtls"] = [ht.pid, ho.pid]

        for peer, ports in peers.items():
            for t, port in ports.items():
                l4.wait_port(port)
        time.sleep(0.5)
        idle_rss = {p: sum(l4.rss_kib(x) for x in v) for p, v in pids.items()}
        order = list(peers)
        for r in range(args.rounds):
            for peer in order:
                ports = peers[peer]
                res = results.setdefault(peer, {k: [] for k, _, _ in TESTS})
                res["iperf3_1"].append(l4.iperf3(ports["iperf3"], 1, args.seconds))
                res["iperf3_4"].append(l4.iperf3(ports["iperf3"], 4, args.seconds))
                p50, p99 = l4.sockperf(ports["sockperf"], args.seconds)
                res["rtt_p50"].append(p50)
                res["rtt_p99"].append(p99)
                res["pgbench"].append(l4.pgbench(ports["pg"], args.seconds))
                res["connrate"].append(connrate(ports["echo"], args.seconds))
                res["connrate_full"].append(connrate(ports["echofull"], args.seconds))
                print(f"round {r + 1}/{args.rounds} {peer:14s} " +
                      " ".join(f"{k}={v[-1]:.2f}" for k, v in res.items()), flush=True)
            order = order[1:] + order[:1]
        loaded_rss = {p: sum(l4.rss_kib(x) for x in v) for p, v in pids.items()}
        profiles = {}
        for peer in pids:
            profiles[peer] = prof.profile(pids[peer], peers[peer], args.seconds)
            print(f"profile {peer}: {profiles[peer]}", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)

    med = {p: {k: statistics.median(v) for k, v in res.items()} for p, res in results.items()}
    d = med["direct"]
    lines = ["| path | " + " | ".join(label for _, label, _ in TESTS) + " |", "|" + "---|" * (len(TESTS) + 1)]
    for p in results:
        cells = [f"{med[p][k]:.2f}" + (f" ({med[p][k] / d[k]:.2f}x)" if p != "direct" else "") for k, _, _ in TESTS]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    vs = []
    if "ringside-mtls" in med and "haproxy-mtls" in med:
        for k, label, higher in TESTS:
            a, b = med["ringside-mtls"][k], med["haproxy-mtls"][k]
            vs.append(f"{label}: {a / b:.2f}x HAProxy" if higher else f"{label}: {a / d[k]:.2f}x direct vs HAProxy {b / d[k]:.2f}x")
    print(table)
    print("; ".join(vs))
    today = datetime.date.today().isoformat()
    path = os.path.join(args.out, f"{today}-mtls.md")
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open(path, "w") as f:
        f.write(f"# Mesh mTLS pair vs HAProxy mutual-TLS pair ({today})\n\n")
        f.write(f"ringside commit `{git}`; {args.rounds} interleaved rounds of {args.seconds} s per test; medians, "
                "ratio to the direct path in parentheses. Client -> proxy A -> mTLS (TLS 1.3, client certificates, "
                "chain verified on both sides) -> proxy B -> server, all on loopback; one worker/thread per proxy.\n\n")
        f.write(table + "\n\n")
        f.write("ringside against HAProxy: " + "; ".join(vs) + "\n\n")
        f.write("RSS of both proxies together (KiB): " + ", ".join(
            f"{p} idle {idle_rss[p]} / after the run {loaded_rss[p]}" for p in idle_rss) + "\n\n")
        f.write("## Profile\n\n" + prof.PROFILE_NOTE + "\n\n" + prof.table(profiles) + "\n\n")
        f.write("Raw values per round:\n\n```\n" + json.dumps(results, indent=1) + "\n```\n\n")
        f.write("## Machine\n\n" + l4.machine() + "\n\n")
        f.write("## Commands\n\n```\n"
                f"bench/tls-compare.sh --rounds {args.rounds} --seconds {args.seconds}"
                + (" --baseline BINARY" if args.baseline else "")
                + (f" --baseline-args '{args.baseline_args}'" if args.baseline_args else "") + "\n"
                "ringside: run --config (listeners with tls: mode origin / terminate, allow_ids, expect_id), workers 1\n"
                "haproxy: nbthread 1, mode tcp, ssl-min-ver TLSv1.3, ssl crt/ca-file/verify required on both sides\n"
                f"ringside-bench connrate --concurrency 4 --duration {args.seconds}s (connect, 1 byte each way, close)\n"
                "full handshakes: ringside origin listener tls.resumption: false; haproxy server no-ssl-reuse\n```\n")
    print(f"report: {path}")


if __name__ == "__main__":
    sys.exit(main())
