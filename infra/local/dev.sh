#!/usr/bin/env bash
# Local development (`make dev`): an S3 API (moto) on 127.0.0.1:9000 whose bucket `dev` holds 32
# synthetic adapters under s3://dev/uploads/, and a Ray head on 127.0.0.1 (GCS 6380, dashboard and
# job server 8265) that runs .venv's Python and wants a token of its own. .dev/env holds what a
# shell needs to reach them (that token, the dev S3 credentials):
#   make dev && . .dev/env
#   .venv/bin/ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.compress ...
# `infra/local/dev.sh stop` (`make dev-stop`) stops what this started and nothing else: other Ray
# clusters of this machine keep running. Ray runs in a temp dir of its own, and only processes of
# that run (the head's process tree, processes with this script's environment, anything naming
# that temp dir) are stopped.
# DEV_S3_PORT, DEV_RAY_PORT, DEV_DASHBOARD_PORT and DEV_STATE (the state folder, .dev) move it.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
STATE=$(realpath -m "${DEV_STATE:-.dev}")
S3_PORT=${DEV_S3_PORT:-9000}
RAY_PORT=${DEV_RAY_PORT:-6380}
DASHBOARD_PORT=${DEV_DASHBOARD_PORT:-8265}

stop() {
    if [[ -f $STATE/moto.pid ]]; then
        kill -- "-$(cat "$STATE/moto.pid")" 2>/dev/null || true
    fi
    if [[ -f $STATE/ray.pid && -f $STATE/ray.tempdir ]]; then
        "$PY" - "$(cat "$STATE/ray.pid")" "$(cat "$STATE/ray.tempdir")" <<'PY'
import os, signal, sys, time

import psutil

head, temp = int(sys.argv[1]), sys.argv[2]


def ours(process):
    """A process of this dev cluster: marked by dev.sh's environment, or naming its temp dir."""
    try:
        if any(temp in part for part in process.cmdline()):
            return True
        return process.environ().get("LORA_SUBSPACE_DEV_RAY") == temp
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


found = {}
try:
    root = psutil.Process(head)
    if ours(root):  # not a reused pid
        found = {p.pid: p for p in [root, *root.children(recursive=True)]}
except psutil.NoSuchProcess:
    pass
found |= {p.pid: p for p in psutil.process_iter() if p.pid != os.getpid() and ours(p)}
for process in found.values():
    try:
        process.terminate()
    except psutil.NoSuchProcess:
        pass
_, alive = psutil.wait_procs(found.values(), timeout=15)
for process in alive:
    try:
        process.kill()
    except psutil.NoSuchProcess:
        pass
psutil.wait_procs(alive, timeout=10)
PY
        rm -rf "$(cat "$STATE/ray.tempdir")"
    fi
    rm -rf "$STATE"
}

if [[ "${1:-start}" == stop ]]; then
    stop
    echo "stopped"
    exit 0
fi

if [[ -f $STATE/ray.pid ]] && kill -0 "$(cat "$STATE/ray.pid")" 2>/dev/null; then
    echo "dev.sh: error: already running (state in $STATE); stop it with make dev-stop" >&2
    exit 1
fi
rm -rf "$STATE"
mkdir -p -m 700 "$STATE"
# A start that fails (a port in use, ...) says why and leaves nothing running.
trap 'stop; echo "dev.sh: error: start failed; nothing left running" >&2' ERR

# Token auth, with a token of this cluster's own (not ~/.ray/auth_token, which other Ray uses).
(umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$STATE/auth_token")
cat >"$STATE/env" <<ENV
# The dev cluster of infra/local/dev.sh: source this file (. $STATE/env) before ray job submit.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token
unset RAY_AUTH_TOKEN
export AWS_ACCESS_KEY_ID=dev AWS_SECRET_ACCESS_KEY=dev AWS_DEFAULT_REGION=us-east-1
ENV
# shellcheck source=/dev/null
. "$STATE/env"
unset RAY_ADDRESS AWS_PROFILE
TEMP=$(mktemp -d /tmp/lora-subspace-dev.XXXXXX)  # short: Ray's socket paths must fit 107 bytes
echo "$TEMP" >"$STATE/ray.tempdir"
# The job's `python` is this venv's: Ray runs an entrypoint with the head's PATH.
export PATH=$ROOT/.venv/bin:$PATH VIRTUAL_ENV=$ROOT/.venv LORA_SUBSPACE_DEV_RAY=$TEMP

setsid "$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT" >"$STATE/moto.log" 2>&1 &
echo $! >"$STATE/moto.pid"
# The head's other ports are free ones, so that it starts beside any other Ray on this machine.
read -r AGENT AGENT_GRPC RUNTIME_ENV METRICS CLIENT < <("$PY" -c '
import socket
sockets = [socket.socket() for _ in range(5)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))')
setsid "$ROOT/.venv/bin/ray" start --head --block --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
    --dashboard-agent-listen-port "$AGENT" --dashboard-agent-grpc-port "$AGENT_GRPC" \
    --runtime-env-agent-port "$RUNTIME_ENV" --metrics-export-port "$METRICS" --ray-client-server-port "$CLIENT" \
    --temp-dir "$TEMP" --disable-usage-stats >"$STATE/ray.log" 2>&1 &
echo $! >"$STATE/ray.pid"

# Ready when moto answers, the demo adapters are uploaded, the job server answers with this token
# and the head's job agent listens: a `ray job submit` right after `make dev` finds them.
"$PY" - "$S3_PORT" "$DASHBOARD_PORT" "$AGENT" "$(cat "$STATE/moto.pid")" "$(cat "$STATE/ray.pid")" <<'PY'
import os, socket, sys, time, urllib.error, urllib.request

import boto3
import torch

from pipeline.io.location import Location
from pipeline.synthetic import generate

s3_port, dashboard_port, agent_port, moto, head = sys.argv[1:]
state = os.path.dirname(os.environ["RAY_AUTH_TOKEN_PATH"])


def wait(what, ready, pid, log, seconds=180):
    deadline = time.time() + seconds
    while not ready():
        try:
            os.kill(int(pid), 0)
            alive = True
        except OSError:
            alive = False
        if not alive or time.time() > deadline:
            with open(os.path.join(state, log), errors="replace") as file:
                tail = file.read()[-2000:]
            sys.exit(f"dev.sh: error: {what} did not start ({'exited' if not alive else 'timed out'}):\n{tail}")
        time.sleep(0.5)


def answers(url, headers=None):
    try:
        urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2)
        return True
    except OSError:
        return False


def listens(port):
    try:
        socket.create_connection(("127.0.0.1", int(port)), timeout=2).close()
        return True
    except OSError:
        return False


endpoint = f"http://127.0.0.1:{s3_port}"
wait(f"the S3 API on {endpoint}", lambda: answers(endpoint), moto, "moto.log")
boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="dev")
generate(Location("s3://dev/uploads", endpoint), 32, preset="tiny", dtype=torch.bfloat16, seed=0)
with open(os.environ["RAY_AUTH_TOKEN_PATH"]) as file:
    bearer = {"Authorization": f"Bearer {file.read().strip()}"}
dashboard = f"http://127.0.0.1:{dashboard_port}"
wait(f"the Ray head (job server {dashboard})", lambda: answers(f"{dashboard}/api/version", bearer), head, "ray.log")
wait("the Ray head's job agent", lambda: listens(agent_port), head, "ray.log")
PY
trap - ERR

cat <<MSG
S3 API on http://127.0.0.1:$S3_PORT: bucket dev, 32 adapters under s3://dev/uploads/
Ray head on 127.0.0.1:$RAY_PORT, dashboard and job server on http://127.0.0.1:$DASHBOARD_PORT (token auth)
  . ${STATE#"$ROOT"/}/env
  .venv/bin/ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- python -m jobs.compress --set source=s3://dev/uploads/ --set store=s3://dev/subspace/ --set endpoint_url=http://127.0.0.1:$S3_PORT --set components=8
Stop with: make dev-stop
MSG
