#!/usr/bin/env python3
"""Pod-to-pod benchmark: client pod -> sidecar -> sidecar -> server pod, plaintext.

Three pairs of pods (network namespaces on one bridge), measured interleaved in one run:
- direct: client pod A1 talks to server pod B1, no sidecars;
- ringside: A2 -> B2 with the real redirect rules (ringside-init) and a ringside sidecar in each pod
  (outbound 15001, inbound 15006), the client unmodified;
- haproxy: A3 -> B3 with an HAProxy sidecar in each pod (mode tcp, splice-auto); the client talks to
  its local HAProxy explicitly (HAProxy has no transparent original-destination listener).

Each server pod runs iperf3, a sockperf server and PostgreSQL. Needs root.
Usage: bench/pods-compare.sh [--rounds N] [--seconds S]
"""

import argparse
import datetime
import json
import os
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import l4_compare as l4  # noqa: E402

ROOT = l4.ROOT
SUBNET = 251
PORTS = {"iperf3": 5201, "sockperf": 11111, "pg": 5432}


def sh(*args, **kw):
    return subprocess.run(list(args), check=True, capture_output=True, text=True, **kw).stdout


class Net:
    def __init__(self):
        self.id = f"rsb{os.getpid() % 100000}"
        self.switch = f"{self.id}-sw"
        self.pods = []
        sh("ip", "netns", "add", self.switch)
        self.x(self.switch, "ip", "link", "add", "br0", "type", "bridge")
        self.x(self.switch, "ip", "link", "set", "br0", "up")

    def x(self, ns, *args):
        return sh("ip", "netns", "exec", ns, *args)

    def pod(self, short):
        k = len(self.pods) + 2
        name = f"{self.id}-{short}"
        sh("ip", "netns", "add", name)
        self.pods.append(name)
        a, b = f"vb{os.getpid() % 100000}{k}a", f"vb{os.getpid() % 100000}{k}b"
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        sh("ip", "link", "set", a, "netns", name)
        sh("ip", "link", "set", b, "netns", self.switch)
        self.x(self.switch, "ip", "link", "set", b, "master", "br0")
        self.x(self.switch, "ip", "link", "set", b, "up")
        ip = f"198.18.{SUBNET}.{k}"
        self.x(name, "ip", "link", "set", "lo", "up")
        self.x(name, "ip", "addr", "add", f"{ip}/24", "dev", a)
        self.x(name, "ip", "link", "set", a, "up")
        return name, ip

    def destroy(self):
        for p in self.pods + [self.switch]:
            subprocess.run(["ip", "netns", "del", p], capture_output=True)


def in_pod(pod, *cmd, user=None):
    pre = ["ip", "netns", "exec", pod]
    if user is not None:
        pw = pwd.getpwnam(user) if isinstance(user, str) else None
        uid, gid = (pw.pw_uid, pw.pw_gid) if pw else (user, user)
        pre += ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    return pre + list(cmd)


def start_servers(procs, work, pod, tag):
    procs.start(in_pod(pod, "iperf3", "-s", "-p", str(PORTS["iperf3"])))
    procs.start(in_pod(pod, "sockperf", "server", "--tcp", "-i", "0.0.0.0", "-p", str(PORTS["sockperf"])))
    d = os.path.join(work, f"pg-{tag}")
    data = os.path.join(d, "data")
    os.makedirs(d)
    shutil.chown(d, "postgres")
    b = l4.pg_bin()
    sh(*(l4.as_postgres() + [f"{b}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"]))
    # The client pod connects from its own address (direct and HAProxy paths).
    with open(os.path.join(data, "pg_hba.conf"), "a") as f:
        f.write("host all all 198.18.0.0/15 trust\n")
    procs.start(in_pod(pod, f"{b}/postgres", "-D", data, "-p", str(PORTS["pg"]), "-k", d,
                       "-c", "listen_addresses=*", "-c", "max_connections=200", user="postgres"))


def wait_in(pod, ip, port, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        r = subprocess.run(in_pod(pod, "python3", "-c",
                                  f"import socket; socket.create_connection(('{ip}', {port}), timeout=0.3).close()"),
                           capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{ip}:{port} not reachable from {pod}")


def iperf3(pod, host, port, streams, seconds):
    out = subprocess.run(in_pod(pod, "iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"),
                         capture_output=True, text=True, timeout=seconds + 30)
    j = json.loads(out.stdout)
    if "error" in j:
        raise RuntimeError(j["error"])
    return j["end"]["sum_received"]["bits_per_second"] / 1e9


def sockperf(pod, host, port, seconds):
    out = subprocess.run(in_pod(pod, "sockperf", "ping-pong", "--tcp", "-i", host, "-p", str(port), "-t", str(seconds),
                                "-m", "64", "--full-rtt"), capture_output=True, text=True, timeout=seconds + 30).stdout
    pct = {float(m.group(1)): float(m.group(2)) for m in re.finditer(r"percentile\s+([\d.]+)\s+=\s+([\d.]+)", out)}
    if 50.0 not in pct:
        raise RuntimeError("sockperf printed no percentiles:\n" + out[-2000:])
    return pct[50.0], pct.get(99.0)


def pgbench(pod, host, port, seconds):
    out = subprocess.run(in_pod(pod, os.path.join(l4.pg_bin(), "pgbench"), "-h", host, "-p", str(port), "-U", "postgres",
                                "-S", "-c", "8", "-j", "2", "-T", str(seconds), "postgres"),
                         capture_output=True, text=True, timeout=seconds + 60)
    m = re.search(r"tps = ([\d.]+)", out.stdout)
    if not m:
        raise RuntimeError("pgbench failed:\n" + out.stdout[-1000:] + out.stderr[-1000:])
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "perf-reports"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("pods-compare needs root (network namespaces, redirect rules)")

    work = tempfile.mkdtemp(prefix="ringside-podbench-")
    os.chmod(work, 0o755)
    procs = l4.Procs()
    net = Net()
    results = {}
    sidecar_pids = {}
    try:
        pairs = {}
        for peer in ["direct", "ringside", "haproxy"]:
            a, _ = net.pod(f"{peer[:4]}a")
            b, bip = net.pod(f"{peer[:4]}b")
            pairs[peer] = (a, b, bip)
            start_servers(procs, work, b, peer)

        # ringside sidecars with the real redirect rules.
        a, b, bip = pairs["ringside"]
        init = os.path.join(ROOT, "target/release/ringside-init")
        ringside = os.path.join(ROOT, "target/release/ringside")
        for pod in (a, b):
            sh(init, "install", "--netns", pod)
        conf_a = os.path.join(work, "ringside-a.yaml")
        conf_b = os.path.join(work, "ringside-b.yaml")
        with open(conf_a, "w") as f:
            f.write("sidecar: {}\nservices:\n")
            for name, port in PORTS.items():
                f.write(f"  - name: {name}\n    port: {port}\n    endpoints: [\"{bip}:{port}\"]\n")
        with open(conf_b, "w") as f:
            f.write("sidecar: {}\nservices:\n")
            for name, port in PORTS.items():
                f.write(f"  - name: {name}\n    port: {port}\n    local: true\n")
        for pod, conf in ((a, conf_a), (b, conf_b)):
            p = procs.start(in_pod(pod, ringside, "run", "--config", conf, "--workers", "1", user=1337),
                            stderr=open(conf + ".log", "w"))
            sidecar_pids.setdefault("ringside", []).append(p.pid)

        # HAProxy sidecars: A listens on loopback and forwards to B's HAProxy, which forwards to
        # the server on loopback.
        a, b, bip = pairs["haproxy"]
        hap_ports = {name: 25000 + i for i, name in enumerate(PORTS)}
        for pod, role in ((a, "out"), (b, "in")):
            conf = os.path.join(work, f"haproxy-{role}.cfg")
            with open(conf, "w") as f:
                f.write("global\n  nbthread 1\n  maxconn 7000\n\ndefaults\n  mode tcp\n  option splice-auto\n"
                        "  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\n")
                for name, port in PORTS.items():
                    if role == "out":
                        f.write(f"listen {name}\n  bind 127.0.0.1:{port}\n  server s {bip}:{hap_ports[name]}\n\n")
                    else:
                        f.write(f"listen {name}\n  bind {bip}:{hap_ports[name]}\n  server s 127.0.0.1:{port}\n\n")
            p = procs.start(in_pod(pod, "haproxy", "-f", conf, "-db"), stderr=open(conf + ".log", "w"))
            sidecar_pids.setdefault("haproxy", []).append(p.pid)

        targets = {
            "direct": (pairs["direct"][0], pairs["direct"][2]),
            "ringside": (pairs["ringside"][0], pairs["ringside"][2]),
            "haproxy": (pairs["haproxy"][0], "127.0.0.1"),
        }
        for peer, (pod, host) in targets.items():
            for port in PORTS.values():
                wait_in(pod, host, port)
        for _, b, _ in pairs.values():
            subprocess.run(in_pod(b, os.path.join(l4.pg_bin(), "pgbench"), "-h", "127.0.0.1", "-p", "5432",
                                  "-U", "postgres", "-i", "-s", "10", "-q", "postgres"), check=True, capture_output=True)
        idle_rss = {p: sum(l4.rss_kib(pid) for pid in pids) for p, pids in sidecar_pids.items()}
        order = list(targets)
        for r in range(args.rounds):
            for peer in order:
                pod, host = targets[peer]
                res = results.setdefault(peer, {k: [] for k, _, _ in l4.TESTS})
                res["iperf3_1"].append(iperf3(pod, host, PORTS["iperf3"], 1, args.seconds))
                res["iperf3_4"].append(iperf3(pod, host, PORTS["iperf3"], 4, args.seconds))
                p50, p99 = sockperf(pod, host, PORTS["sockperf"], args.seconds)
                res["rtt_p50"].append(p50)
                res["rtt_p99"].append(p99)
                res["pgbench"].append(pgbench(pod, host, PORTS["pg"], args.seconds))
                print(f"round {r + 1}/{args.rounds} {peer:9s} " +
                      " ".join(f"{k}={v[-1]:.2f}" for k, v in res.items()), flush=True)
            order = order[1:] + order[:1]
        loaded_rss = {p: sum(l4.rss_kib(pid) for pid in pids) for p, pids in sidecar_pids.items()}
    finally:
        procs.stop_all()
        net.destroy()
        shutil.rmtree(work, ignore_errors=True)

    med = {p: {k: statistics.median(v) for k, v in res.items()} for p, res in results.items()}
    d = med["direct"]
    lines = ["| path | " + " | ".join(label for _, label, _ in l4.TESTS) + " |", "|" + "---|" * (len(l4.TESTS) + 1)]
    for p in results:
        cells = [f"{med[p][k]:.2f}" + (f" ({med[p][k] / d[k]:.2f}x)" if p != "direct" else "") for k, _, _ in l4.TESTS]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    today = datetime.date.today().isoformat()
    path = os.path.join(args.out, f"{today}-pods.md")
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open(path, "w") as f:
        f.write(f"# Pod to pod through two sidecars, plaintext ({today})\n\n")
        f.write(f"ringside commit `{git}`; {args.rounds} interleaved rounds of {args.seconds} s per test; medians, "
                "ratio to the direct pod-to-pod path in parentheses. Client pod -> its sidecar -> the server pod's "
                "sidecar -> server, each pod a network namespace on one bridge (veth).\n\n")
        f.write(table + "\n\n")
        f.write("Sidecar RSS, both sidecars together (KiB): " + ", ".join(
            f"{p} idle {idle_rss[p]} / after the run {loaded_rss[p]}" for p in idle_rss) + "\n\n")
        f.write("Raw values per round:\n\n```\n" + json.dumps(results, indent=1) + "\n```\n\n")
        f.write("## Machine\n\n" + l4.machine() + "\n\n")
        f.write("## Commands\n\n```\n"
                f"bench/pods-compare.sh --rounds {args.rounds} --seconds {args.seconds}\n"
                "ringside: ringside-init install --netns POD; ringside run (sidecar, 1 worker) as uid 1337 in each pod\n"
                "haproxy: 1 thread, mode tcp, option splice-auto; client pod listens on loopback, server pod on its IP\n"
                f"iperf3 -c HOST -p 5201 -t {args.seconds} -P 1|4 -J; "
                f"sockperf ping-pong --tcp -i HOST -p 11111 -t {args.seconds} -m 64 --full-rtt; "
                f"pgbench -S -c 8 -j 2 -T {args.seconds} (scale 10), all run inside the client pod\n```\n")
    print(f"report: {path}")


if __name__ == "__main__":
    sys.exit(main())
