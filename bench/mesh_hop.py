#!/usr/bin/env python3
"""The mesh hop: client pod -> its sidecar -> mTLS -> the server pod's sidecar -> server pod,
measured with `ringside-bench compare` at fixed request rates (open loop, coordinated-omission
corrected), interleaved with:

- direct: a client pod talking to a server pod, no sidecars;
- ringside: the real redirect rules (ringside-init) and a ringside sidecar in each pod doing mesh
  mTLS (TLS 1.3, SPIFFE certificates, intentions checked at the destination); the client is
  unmodified and connects to the server pod's address;
- haproxy: an HAProxy sidecar in each pod doing mutual TLS 1.3 (the client talks to its local
  HAProxy explicitly: HAProxy has no transparent original-destination listener).

The server in each server pod is `ringside-bench echo`. The sidecars' resident memory is sampled
during each run (the larger of the two is reported). Each sidecar gets one worker/thread.
Then `ringside-bench report` writes perf-reports/<date>-mesh-hop.md with the plots. Needs root.

With --baseline-args ARGS, a second ringside pair (peer ringside-baseline) runs the same build with
these extra `ringside run` arguments in the same rounds (an A/B of a setting, e.g. '--idle-spin 200us').

Usage: bench/mesh-hop.sh [--rounds N] [--seconds S] [--rates 1000,10000] [--connections C]
       [--baseline-args ARGS]
"""

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import l4_compare as l4  # noqa: E402
import pods_compare as pc  # noqa: E402
import proxy_profile as prof  # noqa: E402

ROOT = l4.ROOT
PORT = 7000
HAPROXY_TLS_PORT = 7443
NOTE = (
    "Client pod -> its sidecar -> mTLS -> the server pod's sidecar -> `ringside-bench echo` in the server pod "
    "(network namespaces on one bridge, veth), 64-byte request/response over keep-alive TCP connections at a "
    "fixed rate. **direct**: pod to pod, no sidecars. **ringside**: `ringside-init` redirect rules in both pods, "
    "`ringside run` sidecars (one worker each) doing mesh mTLS (TLS 1.3, SPIFFE certificates, an intention "
    "checked at the destination); the client is unmodified. **haproxy**: one HAProxy per pod (nbthread 1) doing "
    "mutual TLS 1.3 with the same certificates; the client connects to its local HAProxy explicitly. "
    "The added latency is the path's percentile minus the direct path's. RSS: the larger of the path's two "
    "sidecars, sampled every 100 ms under load (largest value over all rounds). Written by `bench/mesh-hop.sh`."
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rates", default="1000,10000")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(ROOT, "perf-reports"))
    ap.add_argument("--baseline-args", default=None,
                    help="also run a ringside pair with these extra `ringside run` arguments (peer ringside-baseline)")
    args = ap.parse_args()
    ringside_peers = [("ringside", [])]
    if args.baseline_args is not None:
        ringside_peers.append(("ringside-baseline", args.baseline_args.split()))
    if os.geteuid() != 0:
        sys.exit("mesh-hop needs root (network namespaces, redirect rules)")
    release = os.path.join(ROOT, "target/release")
    bench = os.path.join(release, "ringside-bench")
    ringside = os.path.join(release, "ringside")
    init = os.path.join(release, "ringside-init")

    work = tempfile.mkdtemp(prefix="ringside-meshhop-")
    os.chmod(work, 0o755)
    procs = l4.Procs()
    net = pc.Net()
    try:
        pairs = {}
        for peer in ["direct"] + [name for name, _ in ringside_peers] + ["haproxy"]:
            short = "rbas" if peer == "ringside-baseline" else peer[:4]
            a, _ = net.pod(f"{short}a")
            b, bip = net.pod(f"{short}b")
            pairs[peer] = (a, b, bip)
            procs.start(pc.in_pod(b, bench, "echo", "--listen", f"0.0.0.0:{PORT}"))

        certs = os.path.join(work, "certs")
        pc.sh(bench, "gen-certs", "--out", certs, "client", "server")
        for f in os.listdir(certs):
            os.chown(os.path.join(certs, f), 1337, 1337)
        os.chown(certs, 1337, 1337)
        c = lambda name: os.path.join(certs, name)  # noqa: E731

        # ringside sidecars: redirect rules, mesh mTLS, an intention at the destination.
        mtls = "  mtls:\n    mode: strict\n    cert: {}\n    key: {}\n    ca: {}\n"
        ringside_pids = {}
        for peer, extra in ringside_peers:
            a, b, bip = pairs[peer]
            for pod in (a, b):
                pc.sh(init, "install", "--netns", pod)
            conf_a = os.path.join(work, f"{peer}-client.yaml")
            conf_b = os.path.join(work, f"{peer}-server.yaml")
            with open(conf_a, "w") as f:
                f.write("sidecar:\n" + mtls.format(c("client.crt"), c("client.key"), c("ca.pem")))
                f.write(f"services:\n  - name: server\n    port: {PORT}\n    endpoints: [\"{bip}:{PORT}\"]\n")
            with open(conf_b, "w") as f:
                f.write("sidecar:\n" + mtls.format(c("server.crt"), c("server.key"), c("ca.pem")))
                f.write(f"services:\n  - name: server\n    port: {PORT}\n    local: true\n")
                f.write("intentions:\n  default: deny\n  rules:\n"
                        "    - { source: client, destination: server, action: allow }\n")
            ringside_pids[peer] = []
            for pod, conf in ((a, conf_a), (b, conf_b)):
                cmd = [ringside, "run", "--config", conf, "--workers", "1"] + extra
                p = procs.start(pc.in_pod(pod, *cmd, user=1337), stderr=open(conf + ".log", "w"))
                ringside_pids[peer].append(p.pid)

        # HAProxy sidecars doing mutual TLS 1.3.
        a, b, bip = pairs["haproxy"]
        common = ("global\n  nbthread 1\n  maxconn 7000\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n"
                  "  ssl-default-server-options ssl-min-ver TLSv1.3\n\ndefaults\n  mode tcp\n"
                  "  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\n")
        hap = {
            "client": common + f"listen server\n  bind 127.0.0.1:{PORT}\n"
                               f"  server s {bip}:{HAPROXY_TLS_PORT} ssl crt {c('client.pem')} ca-file {c('ca.pem')} "
                               "verify required\n",
            "server": common + f"listen server\n  bind {bip}:{HAPROXY_TLS_PORT} ssl crt {c('server.pem')} "
                               f"ca-file {c('ca.pem')} verify required\n  server s 127.0.0.1:{PORT}\n",
        }
        haproxy_pids = []
        for pod, role in ((a, "client"), (b, "server")):
            conf = os.path.join(work, f"haproxy-{role}.cfg")
            with open(conf, "w") as f:
                f.write(hap[role])
            p = procs.start(pc.in_pod(pod, "haproxy", "-f", conf, "-db"), stderr=open(conf + ".log", "w"))
            haproxy_pids.append(p.pid)

        targets = [("direct", pairs["direct"][0], f"{pairs['direct'][2]}:{PORT}", [])]
        targets += [(peer, pairs[peer][0], f"{pairs[peer][2]}:{PORT}", ringside_pids[peer])
                    for peer, _ in ringside_peers]
        targets.append(("haproxy", pairs["haproxy"][0], f"127.0.0.1:{PORT}", haproxy_pids))
        for _, pod, addr, _ in targets:
            host, port = addr.rsplit(":", 1)
            pc.wait_in(pod, host, int(port))

        inputs = []
        cpu = []  # (rate, peer, CPU µs and run-queue wait µs per request of both sidecars)
        pressure = []  # (rate, share of the run some task waited for a CPU)
        today = datetime.date.today().isoformat()
        # The raw results go next to the report (relative paths: the commands are quoted in it).
        out_dir = os.path.relpath(args.out, ROOT)
        for i, rate in enumerate(int(r) for r in args.rates.split(",")):
            out = os.path.join(out_dir, f"{today}-mesh-hop-{rate}.json")
            cmd = [bench, "compare", "--rounds", str(args.rounds), "--duration", f"{args.seconds}s",
                   "--rate", str(rate), "--connections", str(args.connections), "--size", str(args.size),
                   "--sockperf-check", "auto" if i == 0 else "off", "--quiet", "--out", out]
            for name, pod, addr, pids in targets:
                spec = f"{name}={addr},netns={pod}"
                if pids:
                    spec += ",pids=" + "+".join(str(p) for p in pids)
                cmd += ["--target", spec]
            print("$ " + " ".join(cmd), flush=True)
            before = {name: (prof.cpu_seconds(pids), prof.run_delay_seconds(pids), prof.wakeups(pids))
                      for name, _, _, pids in targets if pids}
            stall_before, started = prof.cpu_stall_seconds(), time.monotonic()
            subprocess.run(cmd, check=True, cwd=ROOT)
            stall_after, elapsed = prof.cpu_stall_seconds(), time.monotonic() - started
            if stall_before is not None and stall_after is not None:
                pressure.append((rate, (stall_after - stall_before) / elapsed))
            # Every peer ran rounds x seconds at the rate (the sockperf check is not counted: it
            # runs on the direct path only).
            for name, _, _, pids in targets:
                if pids:
                    requests = rate * args.seconds * args.rounds
                    used = prof.cpu_seconds(pids) - before[name][0]
                    waited = prof.run_delay_seconds(pids) - before[name][1]
                    woken = prof.wakeups(pids) - before[name][2]
                    cpu.append((rate, name, used * 1e6 / requests, waited * 1e6 / requests, woken / requests))
            inputs.append(out)
        note = NOTE
        if args.baseline_args is not None:
            note += (" **ringside-baseline**: the same build and set-up as ringside, with "
                     f"`{args.baseline_args}` added to `ringside run` (an A/B of a setting in the same rounds).")
        report = [bench, "report", "--name", "mesh-hop", "--out-dir", out_dir, "--title", "Mesh hop", "--note", note]
        for f in inputs:
            report += ["--input", f]
        subprocess.run(report, check=True, cwd=ROOT)
        path = os.path.join(ROOT, out_dir, f"{today}-mesh-hop.md")
        with open(path, "a") as f:
            f.write("\n## Profile\n\nCPU time of both sidecars of the path (user + system, all threads, from "
                    "/proc) over the whole run at a rate, divided by the requests sent to that path "
                    "(rate x duration x rounds); a request crosses both sidecars twice. Run-queue wait: "
                    "the time the sidecars' threads were runnable but waited for a CPU (from each wake-up "
                    "to running, /proc/PID/task/TID/schedstat), over the same run and divided the same way: "
                    "latency the scheduler adds, not work the proxy does. Wake-ups: the times the sidecars' threads "
                    "slept and were woken (voluntary context switches), per request; a request needs at least "
                    "four (each sidecar is crossed once each way).\n\n"
                    "| rate (requests/s) | path | CPU µs per request, both sidecars | run-queue wait µs per "
                    "request, both sidecars | wake-ups per request |\n|---|---|---|---|---|\n")
            for rate, name, us, waited, woken in cpu:
                f.write(f"| {rate} | {name} | {us:.1f} | {waited:.1f} | {woken:.2f} |\n")
            if pressure:
                f.write("\nCPU pressure of the machine over each rate's run (all peers and the client; the share "
                        "of the time some runnable task waited for a CPU, /proc/pressure/cpu): "
                        + ", ".join(f"{share * 100:.0f} % at {rate}/s" for rate, share in pressure) + ".\n")
    finally:
        procs.stop_all()
        net.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
