#!/usr/bin/env bash
# The main job, for now: a real PostgreSQL behind `ringside forward`, queried and benchmarked
# through the proxy, with ringside's counters printed. Runs until Ctrl-C (or pass --once), then
# stops what it started (by PID) and removes its temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
once=0; [ "${1:-}" = "--once" ] && once=1
bash scripts/deps.sh test
cargo build --release --bin ringside
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d /tmp/ringside-demo.XXXXXX)
as_pg=(); [ "$(id -u)" -eq 0 ] && { chown postgres: "$work"; as_pg=(runuser -u postgres --); }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_port=$(free_port); proxy_port=$(free_port)
proxy_pid=""
cleanup() {
  [ -n "$proxy_pid" ] && kill -TERM "$proxy_pid" 2>/dev/null && wait "$proxy_pid" 2>/dev/null || true
  "${as_pg[@]}" "$pgbin/pg_ctl" -D "$work/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "== PostgreSQL on 127.0.0.1:$pg_port"
"${as_pg[@]}" "$pgbin/initdb" -D "$work/data" -A trust -U postgres --no-sync >/dev/null
"${as_pg[@]}" "$pgbin/pg_ctl" -D "$work/data" -l "$work/pg.log" -w \
  -o "-p $pg_port -k $work -c listen_addresses=127.0.0.1" start >/dev/null

echo "== ringside forward 127.0.0.1:$proxy_port -> 127.0.0.1:$pg_port"
./target/release/ringside forward "127.0.0.1:$proxy_port" "127.0.0.1:$pg_port" --stats-interval 5s &
proxy_pid=$!
sleep 0.5

echo "== psql through ringside"
"$pgbin/psql" -h 127.0.0.1 -p "$proxy_port" -U postgres -Atc "select 'connected through ringside to ' || version()"
echo "== pgbench through ringside (5 s, 8 clients)"
"$pgbin/pgbench" -h 127.0.0.1 -p "$proxy_port" -U postgres -i -s 5 -q postgres 2>&1 | tail -1
"$pgbin/pgbench" -h 127.0.0.1 -p "$proxy_port" -U postgres -c 8 -j 2 -T 5 postgres 2>&1 | grep -E "tps|latency average|failed"
if [ "$once" = 1 ]; then exit 0; fi
echo "== running; connect with: psql -h 127.0.0.1 -p $proxy_port -U postgres   (Ctrl-C to stop)"
wait "$proxy_pid"
