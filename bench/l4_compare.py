#!/usr/bin/env python3
"""L4 side-by-side benchmark: direct vs ringside vs HAProxy vs nginx stream vs socat.

Every peer forwards to the same three servers (iperf3, sockperf, PostgreSQL). The measurements are
interleaved: each round runs every test against every peer, so slow drifts of a shared machine hit
all peers alike. The report gives medians over rounds and ratios to the direct path.

Usage: bench/l4-compare.sh [--rounds N] [--seconds S] [--only ringside,haproxy] [--out DIR]
       [--ringside-args ARGS] [--baseline-args ARGS]
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import proxy_profile as prof

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def rss_kib(pid):
    """RSS of a process and its children, in KiB."""
    total = 0
    pids = [pid]
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        pids += [int(x) for x in out.split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class Procs:
    """Processes started by the benchmark, stopped by PID."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, **kw):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def pg_bin():
    base = "/usr/lib/postgresql"
    versions = sorted((int(v) for v in os.listdir(base) if v.isdigit()), reverse=True)
    return os.path.join(base, str(versions[0]), "bin")


def as_postgres():
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def start_postgres(procs, work, port):
    data = os.path.join(work, "pg")
    os.makedirs(data)
    if os.geteuid() == 0:
        shutil.chown(work, "postgres")
        shutil.chown(data, "postgres")
    b = pg_bin()
    subprocess.run(as_postgres() + [f"{b}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, stdout=subprocess.DEVNULL)
    # postgres itself (not a wrapper) so that it is stopped by its own PID.
    kw = {}
    if os.geteuid() == 0:
        import pwd
        pw = pwd.getpwnam("postgres")
        kw = {"user": pw.pw_uid, "group": pw.pw_gid}
    procs.start([f"{b}/postgres", "-D", data, "-p", str(port), "-k", work,
                 "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200",
                 "-c", "shared_buffers=128MB"], **kw)
    wait_port(port, 30)
    time.sleep(0.5)
    subprocess.run([f"{b}/pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-i", "-s", "10", "-q", "postgres"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_peers(procs, work, targets, only, ringside_args, baseline_args=None):
    """Start every proxy; returns {peer: {target: port}} and {peer: pid}."""
    peers = {"direct": dict(targets)}
    pids = {}
    names = list(targets)

    def ringside(name, extra):
        ports = {t: free_port() for t in names}
        conf = os.path.join(work, f"{name}.toml")
        with open(conf, "w") as f:
            for t in names:
                f.write(f'[[listeners]]\naddress = "127.0.0.1:{ports[t]}"\nservice = "{t}"\n\n')
                f.write(f'[[services]]\nname = "{t}"\nendpoints = ["127.0.0.1:{targets[t]}"]\n\n')
        p = procs.start([os.path.join(ROOT, "target/release/ringside"), "run", "--config", conf] + extra,
                        stderr=open(os.path.join(work, f"{name}.log"), "w"))
        peers[name] = ports
        pids[name] = p.pid

    if "ringside" in only:
        ringside("ringside", ringside_args)
        if baseline_args is not None:
            # The same build with other settings, measured in the same rounds (an A/B of a setting).
            ringside("ringside-baseline", baseline_args)

    if "haproxy" in only:
        ports = {t: free_port() for t in names}
        conf = os.path.join(work, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write("global\n  nbthread 2\n  maxconn 7000\n\ndefaults\n  mode tcp\n  option splice-auto\n"
                    "  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\n")
            for t in names:
                f.write(f"listen {t}\n  bind 127.0.0.1:{ports[t]}\n  server s1 127.0.0.1:{targets[t]}\n\n")
        p = procs.start(["haproxy", "-f", conf, "-db"], stderr=open(os.path.join(work, "haproxy.log"), "w"))
        peers["haproxy"] = ports
        pids["haproxy"] = p.pid

    if "nginx" in only:
        ports = {t: free_port() for t in names}
        conf = os.path.join(work, "nginx.conf")
        with open(conf, "w") as f:
            f.write("load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
                    f"worker_processes 2;\ndaemon off;\npid {work}/nginx.pid;\nerror_log {work}/nginx.err;\n"
                    "events { worker_connections 10000; }\nstream {\n")
            for t in names:
                f.write(f"  server {{ listen 127.0.0.1:{ports[t]}; proxy_pass 127.0.0.1:{targets[t]}; }}\n")
            f.write("}\n")
        p = procs.start(["nginx", "-c", conf, "-e", f"{work}/nginx.err"])
        peers["nginx"] = ports
        pids["nginx"] = p.pid

    if "socat" in only:
        ports = {t: free_port() for t in names}
        for t in names:
            procs.start(["socat", f"TCP-LISTEN:{ports[t]},bind=127.0.0.1,fork,reuseaddr,nodelay",
                         f"TCP:127.0.0.1:{targets[t]},nodelay"])
        peers["socat"] = ports

    for peer, ports in peers.items():
        for target, port in ports.items():
            try:
                wait_port(port)
            except RuntimeError as e:
                raise RuntimeError(f"{peer} ({target}): {e}") from None
    return peers, pids


def iperf3(port, streams, seconds):
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"],
                         capture_output=True, text=True, timeout=seconds + 30)
    j = json.loads(out.stdout)
    if "error" in j:
        raise RuntimeError(j["error"])
    return j["end"]["sum_received"]["bits_per_second"] / 1e9


def sockperf(port, seconds):
    out = subprocess.run(["sockperf", "ping-pong", "--tcp", "-i", "127.0.0.1", "-p", str(port), "-t", str(seconds),
                          "-m", "64", "--full-rtt"],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    pct = {}
    for m in re.finditer(r"percentile\s+([\d.]+)\s+=\s+([\d.]+)", out):
        pct[float(m.group(1))] = float(m.group(2))
    if 50.0 not in pct:
        raise RuntimeError("sockperf printed no percentiles:\n" + out[-2000:])
    return pct[50.0], pct.get(99.0)


def pgbench(port, seconds):
    out = subprocess.run([os.path.join(pg_bin(), "pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                          "-S", "-c", "8", "-j", "2", "-T", str(seconds), "postgres"],
                         capture_output=True, text=True, timeout=seconds + 60)
    m = re.search(r"tps = ([\d.]+)", out.stdout)
    if not m:
        raise RuntimeError("pgbench failed:\n" + out.stdout[-1000:] + out.stderr[-1000:])
    return float(m.group(1))


TESTS = [
    ("iperf3_1", "iperf3 1 stream (Gbit/s)", True),
    ("iperf3_4", "iperf3 4 streams (Gbit/s)", True),
    ("rtt_p50", "sockperf RTT p50 (us)", False),
    ("rtt_p99", "sockperf RTT p99 (us)", False),
    ("pgbench", "pgbench -S (tps)", True),
]


def machine():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node() and 'Linux'} {platform.release()}, {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB"


def version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "?"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--only", default="ringside,haproxy,nginx,socat")
    ap.add_argument("--out", default=os.path.join(ROOT, "perf-reports"))
    ap.add_argument("--name", default="l4")
    ap.add_argument("--ringside-args", default="", help="extra arguments for ringside run")
    ap.add_argument("--baseline-args", default=None,
                    help="also run this build with these extra arguments as peer ringside-baseline "
                         "(e.g. '--idle-spin 0s'), in the same rounds")
    args = ap.parse_args()
    only = args.only.split(",")
    ringside_args = args.ringside_args.split()

    work = tempfile.mkdtemp(prefix="ringside-bench-")
    procs = Procs()
    results = {}
    try:
        targets = {"iperf3": free_port(), "sockperf": free_port(), "pg": free_port()}
        procs.start(["iperf3", "-s", "-p", str(targets["iperf3"])])
        procs.start(["sockperf", "server", "--tcp", "-i", "127.0.0.1", "-p", str(targets["sockperf"])])
        start_postgres(procs, work, targets["pg"])
        baseline_args = args.baseline_args.split() if args.baseline_args is not None else None
        peers, pids = start_peers(procs, work, targets, only, ringside_args, baseline_args)
        time.sleep(0.5)
        idle_rss = {p: rss_kib(pid) for p, pid in pids.items()}
        order = list(peers)
        for r in range(args.rounds):
            for peer in order:
                ports = peers[peer]
                res = results.setdefault(peer, {k: [] for k, _, _ in TESTS})
                res["iperf3_1"].append(iperf3(ports["iperf3"], 1, args.seconds))
                res["iperf3_4"].append(iperf3(ports["iperf3"], 4, args.seconds))
                p50, p99 = sockperf(ports["sockperf"], args.seconds)
                res["rtt_p50"].append(p50)
                res["rtt_p99"].append(p99)
                res["pgbench"].append(pgbench(ports["pg"], args.seconds))
                print(f"round {r + 1}/{args.rounds} {peer:9s} " +
                      " ".join(f"{k}={v[-1]:.2f}" for k, v in res.items()), flush=True)
            # Rotate the order so that no peer always runs first in a round.
            order = order[1:] + order[:1]
        loaded_rss = {p: rss_kib(pid) for p, pid in pids.items()}
        profiles = {}
        for peer, pid in pids.items():
            profiles[peer] = prof.profile([pid], peers[peer], args.seconds)
            print(f"profile {peer}: {profiles[peer]}", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)

    med = {p: {k: statistics.median(v) for k, v in res.items()} for p, res in results.items()}
    d = med["direct"]
    lines = []
    hdr = "| peer | " + " | ".join(label for _, label, _ in TESTS) + " |"
    lines.append(hdr)
    lines.append("|" + "---|" * (len(TESTS) + 1))
    for p in results:
        cells = []
        for k, _, _ in TESTS:
            v = med[p][k]
            cells.append(f"{v:.2f} ({v / d[k]:.2f}x)" if p != "direct" else f"{v:.2f}")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    # What each proxy adds to a round trip, against the best peer's addition (the measure).
    added = {p: (med[p]["rtt_p50"] - d["rtt_p50"], med[p]["rtt_p99"] - d["rtt_p99"]) for p in results if p != "direct"}
    best = {i: min((v[i] for p, v in added.items() if not p.startswith("ringside")), default=None) for i in (0, 1)}
    alines = ["| peer | added RTT p50 (us) | added RTT p99 (us) | p50 vs best peer | p99 vs best peer |",
              "|---|---|---|---|---|"]
    for p, (a50, a99) in added.items():
        r50 = f"{a50 / best[0]:.2f}x" if best[0] else "-"
        r99 = f"{a99 / best[1]:.2f}x" if best[1] else "-"
        alines.append(f"| {p} | {a50:+.1f} | {a99:+.1f} | {r50} | {r99} |")
    added_table = "\n".join(alines)
    print(added_table)

    today = datetime.date.today().isoformat()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{today}-{args.name}.md")
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open(path, "w") as f:
        f.write(f"# L4 fast path, side by side ({today})\n\n")
        f.write(f"ringside commit `{git}`; {args.rounds} interleaved rounds of {args.seconds} s per test; "
                "medians, with the ratio to the direct path in parentheses (throughput and tps: higher is better; "
                "RTT: lower is better).\n\n")
        f.write(table + "\n\n")
        f.write("Added round-trip time (proxy minus direct, medians), and against the best other peer's:\n\n"
                + added_table + "\n\n")
        f.write("## Profile\n\n" + prof.PROFILE_NOTE + "\n\n" + prof.table(profiles) + "\n\n")
        f.write("Raw values per round:\n\n```\n" + json.dumps(results, indent=1) + "\n```\n\n")
        if idle_rss:
            f.write("RSS (KiB, process and children): " + ", ".join(
                f"{p} idle {idle_rss[p]} / after the run {loaded_rss[p]}" for p in idle_rss) + "\n\n")
        f.write("## Machine\n\n" + machine() + "\n\n")
        f.write("Peers: " + "; ".join([
            version(["haproxy", "-v"]), version(["nginx", "-v"]), version(["socat", "-V"])[:60],
            version(["iperf3", "--version"]), version(["sockperf", "--version"]),
            version([os.path.join(pg_bin(), "postgres"), "--version"])]) + "\n\n")
        f.write("## Commands\n\n```\n"
                f"bench/l4-compare.sh --rounds {args.rounds} --seconds {args.seconds} --only {args.only}"
                + (f" --ringside-args '{args.ringside_args}'" if args.ringside_args else "")
                + (f" --baseline-args '{args.baseline_args}'" if args.baseline_args is not None else "") + "\n"
                f"iperf3 -c 127.0.0.1 -p PORT -t {args.seconds} -P 1|4 -J\n"
                f"sockperf ping-pong --tcp -i 127.0.0.1 -p PORT -t {args.seconds} -m 64 --full-rtt\n"
                f"pgbench -h 127.0.0.1 -p PORT -U postgres -S -c 8 -j 2 -T {args.seconds} postgres   (scale 10)\n"
                "ringside run --config <3 listeners, one per server>   (defaults: 2 workers, io_uring, adaptive copy)\n"
                "haproxy: nbthread 2, mode tcp, option splice-auto\n"
                "nginx: worker_processes 2, stream proxy_pass\n"
                "socat: TCP-LISTEN:...,fork,reuseaddr,nodelay TCP:...,nodelay\n```\n")
    print(f"report: {path}")


if __name__ == "__main__":
    sys.exit(main())
