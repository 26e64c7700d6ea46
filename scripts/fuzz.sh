#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ one after the other, each for FUZZ_SECONDS (default 120),
# and prints per target how long it ran, how many inputs it executed and whether it crashed.
# Not part of scripts/test.sh: it takes minutes and needs the nightly toolchain.
#
#   scripts/fuzz.sh                    # every target
#   FUZZ_SECONDS=600 scripts/fuzz.sh ring room_order
#
# Each target starts from the seeds kept in fuzz/corpus/<target>/ (read only) and keeps what it
# learns in fuzz/target/corpus/<target>/ (not in git) for the next run. A crash leaves its input
# in fuzz/artifacts/<target>/; `cargo +nightly fuzz run -s none <target> <file>` replays it. The
# run is niced (FUZZ_NICE, default 19) and one process at a time.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH="${FUZZ_SECONDS:-120}"
NICE="${FUZZ_NICE:-19}"
# No sanitizer: roomwire forbids unsafe code, and without ASan the build is faster and the
# targets run about twice as many inputs. Debug assertions and overflow checks stay on.
FLAGS=(-s none)

if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  nice -n "$NICE" cargo install cargo-fuzz --locked
fi

cd fuzz
if [ "$#" -gt 0 ]; then
  TARGETS=("$@")
else
  mapfile -t TARGETS < <(cargo +nightly fuzz list)
fi

nice -n "$NICE" cargo +nightly fuzz build "${FLAGS[@]}"

LOGS=target/fuzz-logs
mkdir -p "$LOGS"
SUMMARY=()
FAILED=0
for target in "${TARGETS[@]}"; do
  mkdir -p "target/corpus/$target" "corpus/$target"
  log="$LOGS/$target.log"
  printf '\n==> %s for %ss\n' "$target" "$SECONDS_EACH"
  start=$(date +%s)
  status=0
  nice -n "$NICE" cargo +nightly fuzz run "${FLAGS[@]}" "$target" \
    "target/corpus/$target" "corpus/$target" -- \
    -max_total_time="$SECONDS_EACH" -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
  took=$(($(date +%s) - start))
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  if [ "$status" -eq 0 ]; then
    result="ok"
  else
    FAILED=1
    artifact=$(sed -n 's/.*Test unit written to //p' "$log" | tail -n 1)
    result="CRASH (exit $status) ${artifact:-see $log}"
    grep -m 5 -E 'panicked at|ERROR: libFuzzer|==ERROR' "$log" || true
  fi
  line=$(printf '%-16s %6ss %12s runs  %s' "$target" "$took" "${runs:-?}" "$result")
  echo "$line"
  SUMMARY+=("$line")
done

printf '\n==> summary (logs in fuzz/%s)\n' "$LOGS"
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
