#!/usr/bin/env bash
# Seeds the fuzz corpora with real inputs: a bundle made by `suture bundle` from a target and a
# fix compiled here, and real ELF files (a dynamic executable, shared libraries, static
# executables with and without a symbol table).
# Usage: fuzz/seed.sh [path/to/suture]   (default: the debug build in $CARGO_TARGET_DIR or target)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
suture=${1:-${CARGO_TARGET_DIR:-$root/target}/x86_64-unknown-linux-gnu/debug/suture}
c="$root/crates/cli/tests/c"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$here/corpus/bundle_parse" "$here/corpus/elf_module"

# A bundle: level 1 fix of compute() in the engine tests' target.
gcc -O2 -g -pthread "$c/target.c" -o "$work/target"
gcc -O2 -c -fPIE -ffunction-sections -fdata-sections -DCOUNTER=counter -DFACTOR=secret_factor \
    "$c/patch_compute.c" -o "$work/p1.o"
"$suture" keygen --name fuzz --out "$work" >/dev/null
"$suture" bundle --target "$work/target" --object "$work/p1.o" --replace compute \
    --cve CVE-2024-0001 --description "seed bundle for the fuzzer" \
    --key "$work/fuzz.key" --out "$here/corpus/bundle_parse/seed.suture" >/dev/null

# ELF modules.
e="$here/corpus/elf_module"
cp /bin/true "$e/true"
cp "$work/target" "$e/target-pie"
for lib in libdl.so.2 libz.so.1; do
    for d in /usr/lib/x86_64-linux-gnu /lib/x86_64-linux-gnu; do
        [ -e "$d/$lib" ] && { cp -L "$d/$lib" "$e/$lib"; break; }
    done
done
gcc -O2 -static "$c/target.c" -pthread -o "$work/static"
cp "$work/static" "$e/target-static"
strip -o "$e/target-static-stripped" "$work/static"
printf 'void _start(void){for(;;);}\n' >"$work/tiny.c"
gcc -O2 -static -nostdlib -Wl,--build-id "$work/tiny.c" -o "$e/tiny-static"
ls -l "$here/corpus/bundle_parse" "$e"
