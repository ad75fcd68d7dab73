#!/bin/bash
# The node daemon's idle RSS (issue 11): a rendezvous and one node, both on 127.0.0.1,
# the RSS of the node after 8 s (and its anonymous and file-backed parts, and its threads).
# Usage: benchmarks/idle_rss.sh [REPO] (default: this checkout).  The node is started as a user
# starts it (`daemon start`, which runs `python -m pilot daemon start --foreground`, pilot.entry).
# The rendezvous and the node are stopped at the end, on error too.
set -e
cd "${1:-$(dirname "$0")/..}"
D=$(mktemp -d)
RV=
cleanup() {
    PILOT_HOME=$D/n python3 -m pilot daemon stop >/dev/null 2>&1 || true
    if [ -n "$RV" ]; then kill $RV 2>/dev/null || true; wait $RV 2>/dev/null || true; fi
    rm -rf $D
}
trap cleanup EXIT
python3 -m pilot rendezvous start --listen 127.0.0.1:0 --beacon 127.0.0.1:0 --no-store --json > $D/rv.json 2>$D/rv.log &
RV=$!
for _ in $(seq 100); do [ -s $D/rv.json ] && break; sleep 0.2; done  # its banner: at most 20 s
REG=$(python3 -c "import json;print(json.load(open('$D/rv.json'))['registry'])")
BEA=$(python3 -c "import json;print(json.load(open('$D/rv.json'))['beacon'])")
PILOT_HOME=$D/n python3 -m pilot init >/dev/null 2>&1 || true
PILOT_HOME=$D/n python3 -m pilot --json daemon start --registry $REG --beacon $BEA --listen 127.0.0.1:0 > $D/start.json
PID=$(python3 -c "import json;print(json.load(open('$D/start.json'))['pid'])")
sleep 8
grep -E "VmRSS|RssAnon|RssFile|Threads" /proc/$PID/status
