"""The work a proxy does per message and per gigabyte, for the profile section of every report.

For each peer (the PIDs of its proxy processes and the ports it serves):

- CPU time per 64-byte ping-pong message and per GB of iperf3 bulk, from the processes' user and
  system time (/proc/PID/stat) around a timed run, divided by what the run moved;
- system calls per message: `strace -c -f` attached to the proxies during a ping-pong run, every
  call counted, divided by the messages sockperf completed (strace slows the run down; the counts
  per message are what matters, not the rate).

A proxy "message" is one ping-pong round trip: the request crosses every proxy once and the reply
once, so a pair of proxies is counted as a whole.
"""

import json
import os
import re
import subprocess
import tempfile
import time

HZ = os.sysconf("SC_CLK_TCK")


def cpu_times(pids):
    """(user, system) CPU seconds of the processes (all threads), summed."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return user / HZ, system / HZ


def cpu_seconds(pids):
    """User + system CPU seconds of the processes (all threads), summed."""
    return sum(cpu_times(pids))


def kernel_share(before, after):
    """The share of the CPU time between two `cpu_times` samples spent in the kernel."""
    user, system = after[0] - before[0], after[1] - before[1]
    return system / (user + system) if user + system > 0 else None


def thread_files(pids, name):
    """The text of /proc/PID/task/TID/<name> for every thread of the processes (threads that ended
    meanwhile are skipped)."""
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/{name}") as f:
                    yield f.read()
            except OSError:
                pass


def run_delay_seconds(pids):
    """Seconds the processes' threads spent runnable but waiting for a CPU (summed over threads,
    from /proc/PID/task/TID/schedstat: from each wake-up to the moment the thread ran)."""
    return sum(int(text.split()[1]) for text in thread_files(pids, "schedstat")) / 1e9


def wakeups(pids):
    """Times the processes' threads went to sleep and were woken again (voluntary context
    switches, summed over threads, from /proc/PID/task/TID/status)."""
    found = (re.search(r"^voluntary_ctxt_switches:\s+(\d+)", text, re.M) for text in thread_files(pids, "status"))
    return sum(int(m.group(1)) for m in found if m)


def cpu_stall_seconds():
    """The machine's total time some runnable task waited for a CPU (/proc/pressure/cpu, `some`),
    None where the kernel does not tell."""
    try:
        with open("/proc/pressure/cpu") as f:
            m = re.search(r"^some .*total=(\d+)", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) / 1e6 if m else None


def sockperf_messages(port, seconds, addr="127.0.0.1"):
    """Run a 64-byte ping-pong; the number of round trips completed (whole run, warm-up included)."""
    out = subprocess.run(["sockperf", "ping-pong", "--tcp", "-i", addr, "-p", str(port), "-t", str(seconds),
                          "-m", "64"], capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"\[Total Run\].*?ReceivedMessages=(\d+)", out)
    if not m:
        raise RuntimeError("sockperf printed no message count:\n" + out[-2000:])
    return int(m.group(1))


def iperf3_bytes(port, seconds, addr="127.0.0.1"):
    out = subprocess.run(["iperf3", "-c", addr, "-p", str(port), "-t", str(seconds), "-J"],
                         capture_output=True, text=True, timeout=seconds + 30)
    j = json.loads(out.stdout)
    if "error" in j:
        raise RuntimeError(j["error"])
    return j["end"]["sum_received"]["bytes"]


def strace_counts(pids, run):
    """Run `run()` with strace -c -f attached to `pids`; returns ({syscall: calls}, run's result)."""
    with tempfile.NamedTemporaryFile(prefix="ringside-strace-", suffix=".txt", delete=False) as f:
        path = f.name
    cmd = ["strace", "-c", "-f", "-o", path]
    for p in pids:
        cmd += ["-p", str(p)]
    tracer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached to every thread before the run starts
    try:
        result = run()
    finally:
        tracer.send_signal(2)
        tracer.wait(timeout=30)
    counts = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            # % time, seconds, usecs/call, calls, [errors], syscall
            if len(parts) >= 5 and parts[0].replace(".", "", 1).isdigit() and parts[-1] != "total":
                try:
                    counts[parts[-1]] = int(parts[3])
                except ValueError:
                    pass
    os.unlink(path)
    return counts, result


def with_children(pids):
    """The processes and their children (nginx's workers under its master)."""
    out = list(pids)
    for pid in pids:
        r = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
        out += [int(x) for x in r.stdout.split()]
    return out


def profile(pids, ports, seconds=3):
    """The profile of one peer: ports has 'sockperf' and 'iperf3'."""
    pids = with_children(pids)
    t0 = cpu_times(pids)
    msgs = sockperf_messages(ports["sockperf"], seconds)
    t1 = cpu_times(pids)
    nbytes = iperf3_bytes(ports["iperf3"], seconds)
    c0, c1, c2 = sum(t0), sum(t1), cpu_seconds(pids)
    counts, traced = strace_counts(pids, lambda: sockperf_messages(ports["sockperf"], 2))
    per_msg = {k: v / traced for k, v in counts.items() if v / traced >= 0.01}
    return {
        "cpu_us_per_message": (c1 - c0) * 1e6 / msgs if pids else None,
        "kernel_share": kernel_share(t0, t1) if pids else None,
        "cpu_s_per_gb": (c2 - c1) / (nbytes / 1e9) if pids else None,
        "syscalls_per_message": sum(counts.values()) / traced if pids else None,
        "top_syscalls_per_message": dict(sorted(per_msg.items(), key=lambda kv: -kv[1])[:6]),
        "messages_traced": traced,
    }


def share(p):
    """The kernel's share of a profile's CPU time, as a percentage (or - when not measured)."""
    k = p.get("kernel_share")
    return f"{k * 100:.0f} %" if k is not None else "-"


def table(profiles):
    """Markdown table of the profiles of every peer (direct has no proxy and is left out)."""
    lines = ["| peer | CPU µs per message | of it in the kernel | CPU s per GB | system calls per message | "
             "top calls per message |", "|---|---|---|---|---|---|"]
    for peer, p in profiles.items():
        if p.get("cpu_us_per_message") is None:
            continue
        top = ", ".join(f"{k} {v:.2f}" for k, v in p["top_syscalls_per_message"].items())
        lines.append(f"| {peer} | {p['cpu_us_per_message']:.1f} | {share(p)} | {p['cpu_s_per_gb']:.2f} | "
                     f"{p['syscalls_per_message']:.2f} | {top} |")
    return "\n".join(lines)


PROFILE_NOTE = ("CPU time of the proxy processes (all threads, user + system, from /proc) during a 64-byte "
                "ping-pong run divided by its round trips (and the share of it spent in the kernel), and during one iperf3 stream divided by the bytes "
                "moved; system calls counted by `strace -c -f` attached to the proxies during a second "
                "ping-pong run, divided by its round trips (io_uring submissions are inside "
                "`io_uring_enter`). A round trip crosses every proxy of the path twice.")


def http_profile(pids, url, seconds, wrk):
    """CPU and system calls per HTTP request: `wrk(url, seconds, connections)` returns (rps, ...)."""
    pids = with_children(pids)
    t0 = cpu_times(pids)
    rps = wrk(url, seconds, 32)[0]
    t1 = cpu_times(pids)
    c0, c1 = sum(t0), sum(t1)
    counts, traced = strace_counts(pids, lambda: wrk(url, 2, 4)[0] * 2)
    per_rq = {k: v / traced for k, v in counts.items() if v / traced >= 0.01}
    return {
        "cpu_us_per_message": (c1 - c0) * 1e6 / (rps * seconds),
        "kernel_share": kernel_share(t0, t1),
        "syscalls_per_message": sum(counts.values()) / traced,
        "top_syscalls_per_message": dict(sorted(per_rq.items(), key=lambda kv: -kv[1])[:6]),
        "messages_traced": int(traced),
    }


def http_table(profiles):
    lines = ["| peer | CPU µs per request | of it in the kernel | system calls per request | top calls per request |",
             "|---|---|---|---|---|"]
    for peer, p in profiles.items():
        top = ", ".join(f"{k} {v:.2f}" for k, v in p["top_syscalls_per_message"].items())
        lines.append(f"| {peer} | {p['cpu_us_per_message']:.1f} | {share(p)} | {p['syscalls_per_message']:.2f} | {top} |")
    return "\n".join(lines)


HTTP_PROFILE_NOTE = ("CPU time of the proxy processes (all threads, user + system) during a wrk run (-c32, the "
                     "6-byte response) divided by the requests it completed (and the share of it spent in the "
                     "kernel); system calls counted by `strace -c -f` "
                     "attached to the proxies during a 2 s wrk run with 4 connections, divided by its requests "
                     "(strace slows the run; the counts per request are what matters).")
