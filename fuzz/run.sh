#!/usr/bin/env bash
# Runs each fuzz target for SECONDS (default 600), one after the other, one job each.
# Seed the corpora first with fuzz/seed.sh. cargo-fuzz needs nightly features: on a stable
# toolchain RUSTC_BOOTSTRAP=1 unlocks them. A crash is saved under fuzz/artifacts/TARGET/.
# Usage: fuzz/run.sh [SECONDS] [TARGET...]; extra libFuzzer flags in FUZZ_ARGS
# (e.g. FUZZ_ARGS=-max_len=16384: small inputs, many more runs a second on the ELF reader).
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(bundle_parse elf_module)
export RUSTC_BOOTSTRAP=1
status=0
for t in "${targets[@]}"; do
    echo "== $t: ${secs}s"
    # -timeout: an input that takes over 10 s is reported as a hang, not waited on.
    cargo fuzz run "$t" -- -max_total_time="$secs" -timeout=10 -print_final_stats=1 ${FUZZ_ARGS:-} || status=1
done
exit $status
