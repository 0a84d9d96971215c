#!/usr/bin/env bash
# Local development: an S3 API (moto) on 127.0.0.1:9000 with a bucket `dev`, and a local Ray head
# with its dashboard on 127.0.0.1:8265. `infra/local/dev.sh stop` stops both (`ray stop`: every Ray
# process of this machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
STATE=.dev
mkdir -p "$STATE"
if [[ "${1:-start}" == stop ]]; then
    [[ -f $STATE/moto.pid ]] && kill "$(cat $STATE/moto.pid)" 2>/dev/null || true
    if [[ -f $STATE/ray.pid ]]; then
        $PY -m ray.scripts.scripts stop >/dev/null 2>&1 || true
        kill "$(cat $STATE/ray.pid)" 2>/dev/null || true
    fi
    rm -rf "$STATE"
    echo "stopped"
    exit 0
fi
export AWS_ACCESS_KEY_ID=dev AWS_SECRET_ACCESS_KEY=dev AWS_DEFAULT_REGION=us-east-1
setsid $PY -m moto.server -H 127.0.0.1 -p 9000 >"$STATE/moto.log" 2>&1 &
echo $! >"$STATE/moto.pid"
setsid $PY -m ray.scripts.scripts start --head --block --port 6380 \
    --dashboard-host 127.0.0.1 --dashboard-port 8265 --disable-usage-stats >"$STATE/ray.log" 2>&1 &
echo $! >"$STATE/ray.pid"
for _ in $(seq 60); do curl -s -o /dev/null http://127.0.0.1:9000 && break; sleep 1; done
$PY -c "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:9000').create_bucket(Bucket='dev')"
cat <<MSG
S3 API on http://127.0.0.1:9000 (bucket dev), Ray dashboard on http://127.0.0.1:8265 (starting).
  export AWS_ACCESS_KEY_ID=dev AWS_SECRET_ACCESS_KEY=dev AWS_DEFAULT_REGION=us-east-1 RAY_ADDRESS=auto
  .venv/bin/python -m jobs.compress --set source=demo-data/adapters --set store=s3://dev/subspace --set endpoint_url=http://127.0.0.1:9000 --set components=8
Stop with: make dev-stop
MSG
