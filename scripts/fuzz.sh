#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ (kvcache-core's decoders) for a few seconds each, from
# its committed corpus, and fails if any target crashes. Seconds per target: the first argument,
# else KVCACHE_FUZZ_SECONDS, else 5. Installs cargo-fuzz if missing; uses the nightly toolchain
# when one is installed, else stable with RUSTC_BOOTSTRAP=1. Builds into
# $KVCACHE_CACHE_DIR/fuzz-target (default /var/tmp/kvcache-cache). New inputs go to a scratch
# directory, so the committed corpora stay as they are; a crash leaves its input under
# fuzz/artifacts/TARGET/. The long runs and their figures are in fuzz/RESULTS.md.
cd "$(dirname "$0")/.."
. scripts/env.sh
seconds="${1:-${KVCACHE_FUZZ_SECONDS:-5}}"
case "$seconds" in
    '' | *[!0-9]* | 0) echo "error: seconds per target must be a positive integer, got '$seconds'" >&2; exit 2 ;;
esac
fuzz_target_dir="$KVCACHE_CACHE_DIR/fuzz-target"

# libFuzzer needs unstable rustc flags: nightly if present, else stable unlocked for them.
if cargo +nightly --version >/dev/null 2>&1; then
    fuzz=(cargo +nightly fuzz)
else
    echo "no nightly toolchain: building the fuzz targets with stable and RUSTC_BOOTSTRAP=1" >&2
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked >&2
fi

fuzz_dir="$PWD/fuzz"
"${fuzz[@]}" build --fuzz-dir "$fuzz_dir" --target-dir "$fuzz_target_dir" >&2
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# libFuzzer's -jobs mode writes fuzz-0.log into the working directory: keep it in the scratch
# directory, so concurrent runs (or a long run in fuzz/) never read each other's logs.
cd "$scratch"
failed=0
for target in $("${fuzz[@]}" list --fuzz-dir "$fuzz_dir"); do
    log="$scratch/$target.log"
    mkdir -p "$scratch/$target" "$fuzz_dir/corpus/$target"
    # The scratch corpus comes first: libFuzzer writes new inputs only there.
    if "${fuzz[@]}" run --fuzz-dir "$fuzz_dir" --target-dir "$fuzz_target_dir" "$target" \
        "$scratch/$target" "$fuzz_dir/corpus/$target" -- \
        -max_total_time="$seconds" -jobs=1 -workers=1 >"$log" 2>&1; then
        runs=$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1 runs in \2 s/p' "$log" | tail -1)
        cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 || true)
        echo "$target: ok, ${runs:-? runs} (${cov:-no coverage line})"
    else
        failed=1
        echo "$target: FAILED (input under fuzz/artifacts/$target/):"
        # The panic or sanitizer report and where the input went; else the end of the log.
        { grep -E "panicked at|==ERROR|^SUMMARY|Test unit written" "$log" || tail -n 20 "$log"; } |
            head -n 12 | sed 's/^/    /'
    fi
done
exit "$failed"
