#!/usr/bin/env bash
# Install the system packages ringside's tests, demo and benchmarks use. Idempotent: installs only
# what is missing. Usage: scripts/deps.sh [test|bench]
set -euo pipefail
want=(postgresql postgresql-contrib iproute2 procps iptables nftables python3 sockperf util-linux
  protobuf-compiler libprotobuf-dev etcd-server systemd)
if [ "${1:-test}" = bench ]; then
  want+=(iperf3 haproxy nginx-light libnginx-mod-stream socat wrk valgrind curl)
fi
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian package starts a cluster of its own on 5432; nothing here uses it.
# Likewise etcd-server's own member (if its package starts one on 2379): tests start their own
# etcd members on free loopback ports. etcd-client's build runs protoc (protobuf-compiler) on protos
# that import the well-known types (libprotobuf-dev). systemd: `systemd-analyze verify` and
# `systemd-sysusers --dry-run` check deploy/systemd (nothing is started with it).
# Nothing here for the TLS crypto libraries: ring and aws-lc-sys (`--features aws-lc-rs`, built by
# scripts/test.sh) compile their C and assembly with the C compiler (cc) Rust already links with;
# aws-lc-sys takes its cc build (no cmake, clang or nasm) and its pregenerated bindings on Linux.
