#!/usr/bin/env bash
# make loadtest: locust, headless, against $URL, or against a deepserve this script starts.
# Writes locust's CSV and HTML report to results/loadtest-<UTC time>/; the exit code is locust's
# (thresholds in loadtests/locust.conf). LOCUST_ARGS adds flags, e.g. "--run-time 5m --users 64";
# SHAPE=step runs the step load (loadtests/stepload.py) and reports the saturation point.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out="results/loadtest-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
url=${URL:-}
if [ -z "$url" ]; then
  port=${PORT:-3000}
  url="http://127.0.0.1:$port"
  echo "starting deepserve on $url (log: $out/server.log)"
  setsid .venv/bin/bentoml serve service.service:DeepServe --host 127.0.0.1 --port "$port" >"$out/server.log" 2>&1 &
  server=$!
  trap 'kill -TERM -- -$server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
  for _ in $(seq 120); do curl -sf "$url/readyz" >/dev/null && break; sleep 1; done
  curl -sf "$url/readyz" >/dev/null || { echo "deepserve did not become ready"; tail -20 "$out/server.log"; exit 1; }
fi
file=loadtests/locustfile.py
[ "${SHAPE:-}" = step ] && file=loadtests/stepload.py
status=0
# shellcheck disable=SC2086
"$PY" -m locust -f "$file" --config loadtests/locust.conf --host "$url" \
  --csv "$out/locust" --csv-full-history --html "$out/report.html" ${LOCUST_ARGS:-} || status=$?
if [ "${SHAPE:-}" = step ]; then "$PY" loadtests/saturation.py "$out/locust_stats_history.csv" | tee "$out/saturation.txt"; fi
echo "results in $out (exit $status)"
exit $status
