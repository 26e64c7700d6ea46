#!/usr/bin/env bash
# The whole multi-region topology on this machine, in one command:
#
#   regions/run.sh
#
# three NATS servers (eu, us, ap: regions/*.nats.conf) joined by gateways, with JetStream (its
# store in target/regions/jetstream/, for the mesh's token-id bucket), and two roomwire nodes
# per region (regions/<region>.toml, the second one with its id and ports overridden), built with
# `cargo build --release`. It prints the URLs once every node is ready, and stops everything on
# Ctrl-C: the nodes first (each drains: GoAway to its sessions, close 1001), then the NATS servers.
# Logs: target/regions/*.log. The API key for /api/v1/* is printed (ROOMWIRE_API_KEY sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

REGIONS=(eu us ap)
LOGS=target/regions
# Each child in its own process group: Ctrl-C reaches this script only, which then stops the
# nodes before the NATS servers they hand rooms over through.
set -m

step() { printf '==> %s\n' "$*" >&2; }

NATS=$(scripts/nats-server.sh)
step "building roomwire (release)"
cargo build --release --locked --bin roomwire
BIN=target/release/roomwire
mkdir -p "$LOGS" "$LOGS/jetstream"
KEY=${ROOMWIRE_API_KEY:-local-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')}

NATS_PIDS=()
NODE_PIDS=()
stopping=0
cleanup() {
  [ "$stopping" = 1 ] && return
  stopping=1
  trap - INT TERM
  step "stopping the nodes (graceful drain), then the NATS servers"
  for p in "${NODE_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${NODE_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  for p in "${NATS_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${NATS_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap 'cleanup; exit 130' INT TERM
trap cleanup EXIT

# poll DESCRIPTION SECONDS COMMAND...: runs COMMAND every 0.1 s until it succeeds.
poll() {
  local what=$1 seconds=$2
  shift 2
  local tries=$((seconds * 10))
  until "$@" >/dev/null 2>&1; do
    tries=$((tries - 1))
    if [ "$tries" -le 0 ]; then
      echo "timed out waiting for $what (logs in $LOGS/)" >&2
      exit 1
    fi
    sleep 0.1
  done
}
ok() { curl -fsS -o /dev/null --max-time 2 "$@"; }
# gateways_up MONITORING_PORT: the server has an outbound gateway to each other region.
gateways_up() {
  curl -fsS --max-time 2 "http://127.0.0.1:$1/gatewayz" |
    python3 -c 'import json,sys; g=json.load(sys.stdin)["outbound_gateways"] or {}; sys.exit(0 if len([n for n in g.values() if n.get("connection")]) >= 2 else 1)'
}

step "starting nats-server per region: $("$NATS" --version)"
for i in "${!REGIONS[@]}"; do
  r=${REGIONS[$i]}
  "$NATS" -c "regions/$r.nats.conf" >"$LOGS/nats-$r.log" 2>&1 &
  NATS_PIDS+=($!)
done
# Up first (JetStream enabled), then the gateways, then JetStream usable: the regions elect one
# JetStream meta leader among them, which takes several seconds (plain /healthz says when).
for i in "${!REGIONS[@]}"; do
  poll "nats-server ${REGIONS[$i]}" 20 ok "http://127.0.0.1:83$((i + 1))0/healthz?js-enabled-only=true"
done
for i in "${!REGIONS[@]}"; do
  poll "the gateways of ${REGIONS[$i]}" 30 gateways_up "83$((i + 1))0"
done
for i in "${!REGIONS[@]}"; do
  poll "JetStream in ${REGIONS[$i]}" 60 ok "http://127.0.0.1:83$((i + 1))0/healthz"
done

step "starting two roomwire nodes per region"
for i in "${!REGIONS[@]}"; do
  r=${REGIONS[$i]}
  d=$((i + 1))
  RUST_LOG=${RUST_LOG:-info} "$BIN" --config "regions/$r.toml" --set "api.keys=[\"$KEY\"]" \
    >"$LOGS/$r-1.log" 2>&1 &
  NODE_PIDS+=($!)
  RUST_LOG=${RUST_LOG:-info} "$BIN" --config "regions/$r.toml" --set "api.keys=[\"$KEY\"]" \
    --set "node.id=$r-2" --set "server.listen=[\"127.0.0.1:81${d}1\"]" \
    --set "webtransport.listen=[\"[::1]:44${d}1\", \"127.0.0.1:44${d}1\"]" \
    >"$LOGS/$r-2.log" 2>&1 &
  NODE_PIDS+=($!)
done
for i in "${!REGIONS[@]}"; do
  for n in 0 1; do
    poll "node ${REGIONS[$i]}-$((n + 1)) ready" 60 ok "http://127.0.0.1:81$((i + 1))$n/readyz"
  done
done

cat <<EOF

roomwire: 3 regions, 6 nodes, all ready. API key: $KEY

EOF
printf '  %-6s  %-5s  %-22s  %-22s  %s\n' region node WebSocket "demo page" "cluster status"
for i in "${!REGIONS[@]}"; do
  r=${REGIONS[$i]}
  for n in 0 1; do
    port="81$((i + 1))$n"
    printf '  %-6s  %-5s  %-22s  %-22s  %s\n' \
      "$r" "$r-$((n + 1))" "ws://127.0.0.1:$port/ws" "http://localhost:$port/" \
      "http://127.0.0.1:$port/api/v1/cluster"
  done
done
cat <<EOF

  WebTransport: https://localhost:44<region 1-3><node 0-1>/wt (e.g. eu-1 :4410, us-2 :4421)
  NATS:         nats://127.0.0.1:4310 (eu), :4320 (us), :4330 (ap); monitoring :8310, :8320, :8330
                JetStream (one meta group over the three regions) stores in $LOGS/jetstream/
  Try:          curl -H 'Authorization: Bearer $KEY' 'http://127.0.0.1:8110/api/v1/cluster?room=lobby'
                $BIN client --url ws://127.0.0.1:8110/ws --token alice chat lobby
                $BIN client --url ws://127.0.0.1:8131/ws --token bob chat lobby
  Logs:         $LOGS/  — Ctrl-C stops everything.

EOF

# Until Ctrl-C, or until a process dies on its own (then say which, and stop the rest).
set +e
wait -n "${NODE_PIDS[@]}" "${NATS_PIDS[@]}"
status=$?
if [ "$stopping" = 0 ]; then
  echo "a process exited on its own (status $status); see $LOGS/" >&2
  exit 1
fi
