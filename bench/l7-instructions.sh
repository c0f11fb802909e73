#!/usr/bin/env bash
# User-space instructions per HTTP request through each reverse proxy, counted by callgrind:
# ringside's L7 path (`forward --protocol http`, epoll driver: valgrind has no io_uring), nginx
# proxy_pass and HAProxy mode http, each in front of the same nginx origin (6-byte body, HTTP/1.1
# keep-alive, wrk -t1 -c8). The counters are zeroed after a warm-up and dumped after a timed run,
# so start-up is not counted; the count is divided by the requests wrk completed. Instructions
# are deterministic where throughput on these shared 2 cores is not: this is the measure of the
# work a proxy does per request in user space (the kernel's share is in bench/http-compare.sh's
# CPU per request). Writes perf-reports/<date>-l7-instructions.md. Needs valgrind (installed by
# scripts/deps.sh bench). Run it alone on the machine.
#   bench/l7-instructions.sh [SECONDS]   (default 8)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-8}
bash scripts/deps.sh bench
for s in haproxy nginx; do systemctl stop "$s" >/dev/null 2>&1 || true; done
cargo build --release --bin ringside
root=$(pwd)
work=$(mktemp -d /tmp/ringside-l7ir.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
nginx_conf() { # DIR LISTEN-BLOCK
    mkdir -p "$1/logs"
    cat > "$1/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process off;
pid $1/nginx.pid;
error_log stderr;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $1/body; proxy_temp_path $1/proxy; fastcgi_temp_path $1/fcgi;
  uwsgi_temp_path $1/uwsgi; scgi_temp_path $1/scgi;
$2
}
EOF
}
origin=$(port)
nginx_conf "$work/origin" "  server { listen 127.0.0.1:$origin; location / { return 200 \"hello\n\"; } }"
nginx -p "$work/origin" -c "$work/origin/nginx.conf" 2>"$work/origin.log" &
pids+=($!)

# measure NAME PORT COMMAND...: the proxy under callgrind, then "NAME REQUESTS INSTRUCTIONS".
measure() {
    local name=$1 p=$2
    shift 2
    valgrind --tool=callgrind --callgrind-out-file="$work/cg.$name.%p" "$@" 2>"$work/$name.log" &
    local vg=$!
    pids+=("$vg")
    local up=0
    for _ in $(seq 1 120); do
        if curl -s -m 20 -o /dev/null "http://127.0.0.1:$p/small"; then up=1; break; fi
        sleep 0.5
    done
    if [ "$up" != 1 ]; then
        echo "$name did not answer under valgrind (log: $work/$name.log)" >&2
        return 1
    fi
    wrk -t1 -c8 -d3s "http://127.0.0.1:$p/small" >/dev/null
    callgrind_control -z "$vg" >/dev/null
    local out n
    out=$(wrk -t1 -c8 -d"${seconds}s" "http://127.0.0.1:$p/small")
    n=$(echo "$out" | awk '/requests in/{print $1}')
    callgrind_control -d "$vg" >/dev/null
    sleep 1
    kill "$vg" 2>/dev/null || true
    wait "$vg" 2>/dev/null || true
    local ir
    ir=$(grep -h '^summary:' "$work"/cg."$name".*.1 | awk '{s+=$2} END {print s}')
    if echo "$out" | grep -q "Non-2xx\|Socket errors"; then
        echo "$name: wrk saw failures:" >&2
        echo "$out" >&2
        return 1
    fi
    echo "$name $n $ir" >>"$work/results"
}

p=$(port)
measure ringside "$p" "$root/target/release/ringside" forward "127.0.0.1:$p" "127.0.0.1:$origin" \
    --protocol http --workers 1 --l7-threads 1 --driver epoll
p=$(port)
nginx_conf "$work/proxy" "  upstream o { server 127.0.0.1:$origin; keepalive 64; }
  server { listen 127.0.0.1:$p; location / { proxy_pass http://o; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
measure nginx "$p" nginx -p "$work/proxy" -c "$work/proxy/nginx.conf"
p=$(port)
cat > "$work/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 5000
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 1m
  timeout server 1m
listen web
  bind 127.0.0.1:$p
  server origin 127.0.0.1:$origin
EOF
measure haproxy "$p" haproxy -f "$work/haproxy.cfg" -db

date=$(date -u +%Y-%m-%d)
report=perf-reports/$date-l7-instructions.md
python3 - "$work/results" "$report" "$seconds" "$(git rev-parse --short HEAD)" <<'EOF'
import datetime, os, platform, sys
src, out, seconds, commit = sys.argv[1:5]
rows = [l.split() for l in open(src) if l.strip()]
per = {name: int(ir) / int(n) for name, n, ir in rows}
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
lines = [
    "# HTTP reverse proxy: user-space instructions per request (callgrind)",
    "",
    f"{now}, ringside commit `{commit}`, kernel {platform.release()}. Command: `bench/l7-instructions.sh {seconds}`.",
    "Each proxy alone under `valgrind --tool=callgrind` in front of one nginx origin (6-byte body),",
    f"wrk -t1 -c8 HTTP/1.1 keep-alive for {seconds} s after a 3 s warm-up; counters zeroed after the warm-up.",
    "ringside: `forward --protocol http --workers 1 --l7-threads 1 --driver epoll` (valgrind has no",
    "io_uring; the L7 path runs on tokio either way). nginx: proxy_pass with upstream keep-alive, one",
    "worker. HAProxy: mode http, one thread, http-reuse always. User space only: the kernel's work",
    "(the larger share) is in the CPU per request of bench/http-compare.sh.",
    "",
    "| proxy | requests | instructions per request | vs nginx |",
    "|---|---|---|---|",
]
for name, n, ir in rows:
    ratio = per[name] / per["nginx"] if "nginx" in per else float("nan")
    lines.append(f"| {name} | {int(n):,} | {per[name]:,.0f} | {ratio:.2f}x |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
print("wrote", out)
EOF
