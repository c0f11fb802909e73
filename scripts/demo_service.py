#!/usr/bin/env python3
"""A small service of the demo mesh: answers HTTP with a JSON document about itself and what it
called on the way.

Each request is answered with: the service's name, the caller's identity as its sidecar verified it
(the URI in `x-forwarded-client-cert`, added by the destination sidecar after mesh mTLS), the
request id, and the answers of the services it calls (`--call NAME=URL`, each fetched in turn with
the request id passed on), plus the rows of an SQL query (`--sql`, run with psql against
`--pg HOST:PORT`). A called service that fails is reported with its status and ringside's
`x-ringside-reason` header instead of failing the whole answer.

    demo_service.py --name products-api --listen 127.0.0.1:8080 --pg postgres:5432 \
        --sql "select name, price from products order by id"
"""

import argparse
import http.server
import json
import os
import subprocess
import urllib.error
import urllib.request


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--listen", required=True, help="HOST:PORT")
    p.add_argument("--call", action="append", default=[], help="NAME=URL, repeatable")
    p.add_argument("--pg", help="PostgreSQL HOST:PORT for --sql")
    p.add_argument("--sql", help="query whose rows go into the answer")
    p.add_argument("--psql", default="psql", help="psql binary")
    return p.parse_args()


ARGS = parse_args()


def caller_identity(xfcc):
    """The URI field of the last element of x-forwarded-client-cert (the direct caller)."""
    if not xfcc:
        return None
    last = xfcc.split(",")[-1]
    for field in last.split(";"):
        k, _, v = field.partition("=")
        if k.strip() == "URI":
            return v.strip().strip('"')
    return None


def call(url, request_id):
    req = urllib.request.Request(url, headers={"x-request-id": request_id or ""})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return {
            "error": e.code,
            "reason": e.headers.get("x-ringside-reason"),
            "body": e.read().decode(errors="replace").strip(),
        }
    except (urllib.error.URLError, OSError, ValueError) as e:
        return {"error": str(e)}


def query():
    host, _, port = ARGS.pg.rpartition(":")
    out = subprocess.run(
        [ARGS.psql, "-h", host, "-p", port, "-U", "postgres", "-d", "shop", "-AtF", "|", "-c", ARGS.sql],
        capture_output=True,
        text=True,
        timeout=10,
        env=dict(os.environ, PGCONNECT_TIMEOUT="5"),
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip()}
    return [line.split("|") for line in out.stdout.splitlines()]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        request_id = self.headers.get("x-request-id")
        answer = {
            "service": ARGS.name,
            "caller": caller_identity(self.headers.get("x-forwarded-client-cert")),
            "request_id": request_id,
            "path": self.path,
        }
        calls = {}
        for spec in ARGS.call:
            name, _, url = spec.partition("=")
            calls[name] = call(url, request_id)
        if calls:
            answer["calls"] = calls
        if ARGS.sql:
            answer["rows"] = query()
        body = (json.dumps(answer, indent=1) + "\n").encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


def main():
    host, _, port = ARGS.listen.rpartition(":")
    server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
