#!/usr/bin/env bash
# Patchability bench: real Debian 12 security patches through `suture build`, each bundle
# applied to a running process and reverted. Not part of CI or `cargo test`.
#
#   bench/patchability/run.sh [FIXES...]     # FIXES: lines of fixes.txt to run (pkg or pkg/patch);
#                                            # none = all of fixes.txt
#   bench/patchability/run.sh --table        # only rewrite the Markdown table from results.tsv
#
# Environment:
#   SUTURE     the suture binary (default: target/x86_64-unknown-linux-gnu/release/suture of this
#              repository, or the same under $CARGO_TARGET_DIR)
#   PB_WORK    work folder (default /work/pb-work): sources, trees, deployed binaries, bundles, logs
#   PB_NICE    prefix for heavy commands (default "nice -n 19")
#   PB_JOBS    make -j (default 1)
#
# Per fix: the package's tree is put (quilt) at the state just before the fix (every earlier
# patch of debian/patches/series applied, the fix and later ones not), the package's library is
# built with its normal build (dpkg-buildflags, the configure options of debian/rules) and
# stripped: that is the deployed binary. `suture build` gets the tree, the fix as --diff, the
# deployed binary as --target and the same build command. A driver (drivers/main.c + the
# package's drivers/PKG.c) linked against the deployed library keeps calling the library from a
# worker thread and answers a line on stdin with a line on stdout; the bundle is applied with
# `suture apply --pid`, the driver must still be alive and answer, `suture status` must say
# applied, then `suture revert`, and the driver must still be alive and answer.
# One row per fix goes to $PB_WORK/results.tsv; the table to $PB_WORK/results.md.
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PB_WORK="${PB_WORK:-/work/pb-work}"
PB_NICE="${PB_NICE:-nice -n 19}"
PB_JOBS="${PB_JOBS:-1}"
SUTURE="${SUTURE:-${CARGO_TARGET_DIR:-$REPO/target}/x86_64-unknown-linux-gnu/release/suture}"
RESULTS="$PB_WORK/results.tsv"
export MAKEFLAGS="-j$PB_JOBS"
export DEB_BUILD_MAINT_OPTIONS="${DEB_BUILD_MAINT_OPTIONS:-}"

mkdir -p "$PB_WORK"

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# Loads pkgs/PKG.conf: SRC (source package), PREP (run once on the unpatched tree), CONFIGURE
# (run once, at the state before the package's first selected fix), BUILD (the build command,
# for the deployed build and for suture), ARTIFACT (the library in the tree after BUILD),
# (CONFIGURE runs with dpkg-buildflags' flags exported, as dh_auto_configure does), CLEAN (extra paths to delete before a deployed build), DRV_CFLAGS (relative to the tree),
# DRV_LIBS.
load_conf() {
    SRC="" PREP="" CONFIGURE="" BUILD="" ARTIFACT="" CLEAN="" DRV_CFLAGS="" DRV_LIBS=""
    # shellcheck disable=SC1090
    source "$HERE/pkgs/$1.conf"
}

# The package's tree at $PB_WORK/PKG/src, unpatched (quilt pop -a), PREP done.
prepare_pkg() {
    local pkg="$1" dir="$PB_WORK/$pkg"
    [ -f "$dir/.prepared" ] && return 0
    mkdir -p "$dir/fetch"
    if ! ls -d "$dir"/fetch/*/debian >/dev/null 2>&1; then
        (cd "$dir/fetch" && apt-get source -q "$SRC") >"$dir/fetch.log" 2>&1 || return 1
    fi
    local extracted
    extracted="$(dirname "$(ls -d "$dir"/fetch/*/debian | head -1)")"
    rm -rf "$dir/src"
    cp -a "$extracted" "$dir/src"
    (cd "$dir/src" && QUILT_PATCHES=debian/patches quilt pop -a -q) >"$dir/quilt.log" 2>&1
    if [ -n "$PREP" ]; then
        (cd "$dir/src" && $PB_NICE bash -c "$PREP") >"$dir/prep.log" 2>&1 || return 1
    fi
    touch "$dir/.prepared"
}

# Series entries (patch names) of the package, in order.
series() {
    sed -e 's/#.*//' -e 's/[[:space:]]\+-p[0-9]//' -e '/^[[:space:]]*$/d' \
        "$PB_WORK/$1/src/debian/patches/series" | awk '{print $1}'
}

# Puts the tree at the state just before PATCH (quilt push only: fixes run in series order).
goto_before() {
    local pkg="$1" patch="$2" prev=""
    local p
    for p in $(series "$pkg"); do
        [ "$p" = "$patch" ] && break
        prev="$p"
    done
    (
        cd "$PB_WORK/$pkg/src" || exit 1
        export QUILT_PATCHES=debian/patches
        local top
        top="$(quilt top 2>/dev/null || true)"
        if [ -n "$(quilt applied 2>/dev/null | grep -Fx "debian/patches/$patch")" ] ||
            [ -n "$(quilt applied 2>/dev/null | grep -Fx "$patch")" ]; then
            # Past the fix (a re-run): back to the unpatched tree (forced: configure may have
            # rewritten files the patches touch), configured again, then forward.
            echo "the tree is past $patch (top: $top): quilt pop -a -f" >&2
            quilt pop -a -f -q >/dev/null || exit 1
            rm -f "$PB_WORK/$1/.configured"
        fi
        if [ -n "$prev" ] && [ "$(quilt top 2>/dev/null)" != "debian/patches/$prev" ] &&
            [ "$(quilt top 2>/dev/null)" != "$prev" ]; then
            quilt push -q "$prev" >/dev/null || exit 1
        fi
    )
}

purge_outputs() {
    local t="$1"
    find "$t" -path "$t/.pc" -prune -o -type f \( -name '*.o' -o -name '*.lo' -o -name '*.la' \
        -o -name '*.a' -o -name '*.so' -o -name '*.so.*' \) -print0 | xargs -0r rm -f
    find "$t" -type d -name .libs -prune -exec rm -rf {} +
    local c
    for c in $CLEAN; do rm -rf "${t:?}/$c"; done
}

# One result row: pkg patch cve result reason functions new bundle_bytes build_s detail
row() {
    local IFS=$'\t'
    # A re-run replaces the fix's earlier row.
    if [ -f "$RESULTS" ]; then
        awk -F'\t' -v p="$1" -v f="$2" '!($1 == p && $2 == f)' "$RESULTS" >"$RESULTS.new"
        mv "$RESULTS.new" "$RESULTS"
    fi
    printf '%s\n' "$*" >>"$RESULTS"
}

one_line() { tr '\n\t' '  ' | sed -e 's/  */ /g' -e 's/^ //' -e 's/ $//' | cut -c1-400; }

# Driver control: ping waits for one more answer line.
ping_driver() {
    local out="$1" n
    n="$(wc -l <"$out")"
    echo ping >&3 || return 1
    for _ in $(seq 1 100); do
        [ "$(wc -l <"$out")" -gt "$n" ] && { tail -1 "$out"; return 0; }
        sleep 0.05
    done
    return 1
}

alive() { [ -d "/proc/$1" ] && ! grep -q '^State:.*[ZX]' "/proc/$1/status" 2>/dev/null; }

run_fix() {
    local pkg="$1" patch="$2" cve="$3"
    local dir="$PB_WORK/$pkg" id="${patch%.patch}"
    id="${id%.diff}"
    local fx="$dir/fixes/$id"
    rm -rf "$fx"
    mkdir -p "$fx/deployed" "$fx/tmp"
    log "$pkg $patch ($cve)"
    load_conf "$pkg"
    if ! prepare_pkg "$pkg"; then
        row "$pkg" "$patch" "$cve" "harness-failed" "" "" "" "" "" "cannot fetch or prepare the source (see $dir)"
        return
    fi
    local t="$dir/src"
    if ! goto_before "$pkg" "$patch" 2>"$fx/goto.log"; then
        row "$pkg" "$patch" "$cve" "harness-failed" "" "" "" "" "" "quilt: $(one_line <"$fx/goto.log")"
        return
    fi
    cp "$t/debian/patches/$patch" "$fx/fix.diff"
    if [ ! -f "$dir/.configured" ] && [ -n "$CONFIGURE" ]; then
        log "  configure"
        if ! (cd "$t" && $PB_NICE bash -c "eval \"\$(dpkg-buildflags --export=sh)\"; $CONFIGURE") >"$dir/configure.log" 2>&1; then
            row "$pkg" "$patch" "$cve" "harness-failed" "" "" "" "" "" "configure failed: $(tail -1 "$dir/configure.log" | one_line)"
            return
        fi
    fi
    touch "$dir/.configured"

    # The deployed binary: the package's build at this state, stripped.
    log "  deployed build"
    purge_outputs "$t"
    local t0 t1
    t0=$(date +%s)
    if ! (cd "$t" && $PB_NICE bash -c "$BUILD") >"$fx/deployed-build.log" 2>&1; then
        row "$pkg" "$patch" "$cve" "harness-failed" "" "" "" "" "" "deployed build failed: $(tail -1 "$fx/deployed-build.log" | one_line)"
        return
    fi
    t1=$(date +%s)
    local lib
    lib="$(basename "$ARTIFACT")"
    cp -L "$t/$ARTIFACT" "$fx/deployed/$lib"
    strip --strip-unneeded "$fx/deployed/$lib"
    local soname
    soname="$(readelf -d "$fx/deployed/$lib" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')"
    [ -n "$soname" ] && [ "$soname" != "$lib" ] && ln -sf "$lib" "$fx/deployed/$soname"
    # The driver, linked against the deployed library (built now: headers the build generates
    # are deleted with the outputs).
    local inc="" f
    for f in $DRV_CFLAGS; do
        case "$f" in -I/*) inc="$inc $f" ;; -I*) inc="$inc -I$t/${f#-I}" ;; *) inc="$inc $f" ;; esac
    done
    # shellcheck disable=SC2086
    if ! gcc -O2 -pthread $inc -o "$fx/driver" "$HERE/drivers/main.c" "$HERE/drivers/$pkg.c" \
        "$fx/deployed/$lib" $DRV_LIBS >"$fx/driver-build.log" 2>&1; then
        row "$pkg" "$patch" "$cve" "harness-failed" "" "" "" "" "" "driver does not compile: $(grep -m1 error "$fx/driver-build.log" | one_line)"
        return
    fi
    purge_outputs "$t"
    echo "$((t1 - t0))" >"$fx/deployed-build.seconds"

    # suture build
    log "  suture build"
    local cves=() c
    for c in ${cve//,/ }; do
        case "$c" in CVE-*) cves+=(--cve "$c") ;; esac
    done
    t0=$(date +%s.%N)
    TMPDIR="$fx/tmp" $PB_NICE "$SUTURE" build --json --source "$t" --diff "$fx/fix.diff" \
        --target "$fx/deployed/$lib" --build-cmd "$BUILD" --artifact "$ARTIFACT" \
        "${cves[@]}" --key "$PB_WORK/keys/bench.key" --out "$fx/fix.suture" \
        >"$fx/build.json" 2>"$fx/build.stderr" </dev/null
    local rc=$?
    t1=$(date +%s.%N)
    local secs
    secs="$(printf '%.0f' "$(echo "$t1 - $t0" | bc)")"
    local ok kind reason err
    ok="$(jq -r '.ok' "$fx/build.json" 2>/dev/null)"
    if [ "$ok" != "true" ]; then
        kind="$(jq -r '.kind // "error"' "$fx/build.json" 2>/dev/null)"
        reason="$(jq -r '.reason // ""' "$fx/build.json" 2>/dev/null)"
        err="$(jq -r '.error // ""' "$fx/build.json" 2>/dev/null | one_line)"
        [ -z "$err" ] && err="exit $rc: $(tail -3 "$fx/build.stderr" | one_line)"
        if [ "$kind" = "refused" ] && [ "$reason" = "no-code-change" ]; then
            row "$pkg" "$patch" "$cve" "no-code-change" "$reason" "" "" "" "$secs" "$err"
        elif [ "$kind" = "refused" ]; then
            row "$pkg" "$patch" "$cve" "refused" "$reason" "" "" "" "$secs" "$err"
        else
            row "$pkg" "$patch" "$cve" "build-failed" "" "" "" "" "$secs" "$err"
        fi
        return
    fi
    local nfun nnew bytes summary
    nfun="$(jq '.summary.changed + .summary.pulled_in | length' "$fx/build.json")"
    nnew="$(jq '.summary.new_functions | length' "$fx/build.json")"
    bytes="$(jq '.bundle_bytes' "$fx/build.json")"
    summary="changed: $(jq -r '.summary.changed | join(" ")' "$fx/build.json")"
    local extra
    extra="$(jq -r '[(.summary.pulled_in|length|tostring)+" pulled in", (.summary.noise|length|tostring)+" noise", (.summary.warnings|join("; "))] | map(select(. != "" and (startswith("0 ")|not))) | join(", ")' "$fx/build.json")"
    [ -n "$extra" ] && summary="$summary; $extra"

    # The driver: started, patched, reverted.
    rm -f "$fx/in"
    mkfifo "$fx/in"
    exec 3<>"$fx/in"
    (cd "$fx" && LD_LIBRARY_PATH="$fx/deployed" exec ./driver <"$fx/in" >"$fx/out" 2>"$fx/err") &
    local pid=$!
    local res="applied+reverted" detail="$summary" a1 a2 a3
    sleep 0.5
    if ! a1="$(ping_driver "$fx/out")"; then
        res="harness-failed"
        detail="the driver does not answer before the patch: $(one_line <"$fx/err")"
    elif ! grep -qF "$fx/deployed/$lib" "/proc/$pid/maps"; then
        res="harness-failed"
        detail="the driver does not map the deployed library"
    else
        $PB_NICE "$SUTURE" apply --json "$fx/fix.suture" --pid "$pid" \
            --trust "$PB_WORK/keys/bench.pub" >"$fx/apply.json" 2>"$fx/apply.stderr" </dev/null
        if [ "$(jq -r '.ok' "$fx/apply.json" 2>/dev/null)" != "true" ] ||
            [ "$(jq -r '.failures | length' "$fx/apply.json" 2>/dev/null)" != "0" ]; then
            res="apply-failed"
            detail="$( (jq -r '.error // (.failures[0].error)' "$fx/apply.json" 2>/dev/null || cat "$fx/apply.stderr") | one_line)"
        fi
        sleep 1
        if ! alive "$pid"; then
            res="broken"
            detail="the process died after apply: $(one_line <"$fx/err")"
        elif ! a2="$(ping_driver "$fx/out")"; then
            res="broken"
            detail="the process no longer answers after apply"
        elif [ "$res" = "applied+reverted" ]; then
            "$SUTURE" status --json --pid "$pid" >"$fx/status.json" 2>&1
            local pid_status
            pid_status="$(jq -r --arg m "$fx/deployed/$lib" '[.processes[0].patches[] | select(.module == $m)] | length' "$fx/status.json" 2>/dev/null)"
            if [ "$pid_status" != "1" ] || [ "$(jq '.processes[0].other | length' "$fx/status.json")" != "0" ]; then
                res="apply-failed"
                detail="status does not show the patch applied: $(one_line <"$fx/status.json")"
            fi
            $PB_NICE "$SUTURE" revert --json --pid "$pid" >"$fx/revert.json" 2>"$fx/revert.stderr"
            if [ "$(jq -r '.ok' "$fx/revert.json" 2>/dev/null)" != "true" ]; then
                res="revert-failed"
                detail="$( (jq -r '.error // (.failures[0].error)' "$fx/revert.json" 2>/dev/null || cat "$fx/revert.stderr") | one_line)"
            fi
            sleep 0.5
            if ! alive "$pid"; then
                res="broken"
                detail="the process died after revert: $(one_line <"$fx/err")"
            elif ! a3="$(ping_driver "$fx/out")"; then
                res="broken"
                detail="the process no longer answers after revert"
            fi
        fi
        printf 'before: %s\npatched: %s\nreverted: %s\n' "$a1" "${a2:-}" "${a3:-}" >"$fx/answers"
    fi
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    exec 3>&-
    row "$pkg" "$patch" "$cve" "$res" "" "$nfun" "$nnew" "$bytes" "$secs" "$detail"
    rm -rf "$fx/tmp"
}

# What the bundle carries, from build.json: changed and pulled-in functions, warnings.
bundle_details() {
    jq -r '.summary as $s
        | ([(if ($s.changed | length) > 0 then "changed: " + ($s.changed | join(", ")) else empty end),
            (if ($s.pulled_in | length) > 0 then "pulled in: " + ($s.pulled_in | join(", ")) else empty end),
            (if ($s.new_functions | length) > 0 then "new: " + ($s.new_functions | join(", ")) else empty end),
            (if ($s.warnings | length) > 0 then "warnings: " + ($s.warnings | join("; ")) else empty end)]
           | join("; "))' "$1" 2>/dev/null
}

# The rows in the order of fixes.txt (re-runs append at the end of results.tsv).
sorted_rows() {
    awk -F'\t' 'NR == FNR { if ($0 !~ /^#/ && NF) { split($0, w, /[ \t]+/); o[w[1] "/" w[2]] = ++n }; next }
        { k = $1 "/" $2; printf "%d\t%s\n", (k in o ? o[k] : 99999), $0 }' \
        "$HERE/fixes.txt" "$RESULTS" | sort -s -n -k1,1 | cut -f2-
}

table() {
    local md="$PB_WORK/results.md"
    {
        echo "| # | package | patch | CVE | result | reason | functions (+new) | bundle bytes | build s | details |"
        echo "|---:|---|---|---|---|---|---:|---:|---:|---|"
        local n=0 pkg patch cve res reason nfun nnew bytes secs detail id fun
        # (tabs to \x1f: read would merge empty tab-separated fields)
        while IFS=$'\x1f' read -r pkg patch cve res reason nfun nnew bytes secs detail; do
            n=$((n + 1))
            id="${patch%.patch}"
            id="${id%.diff}"
            if [ "$res" = "applied+reverted" ] && [ -f "$PB_WORK/$pkg/fixes/$id/build.json" ]; then
                detail="$(bundle_details "$PB_WORK/$pkg/fixes/$id/build.json")"
            fi
            fun="$nfun"
            [ -n "$nnew" ] && [ "$nnew" != "0" ] && fun="$nfun (+$nnew)"
            printf '| %d | %s | `%s` | %s | %s | %s | %s | %s | %s | %s |\n' "$n" "$pkg" "$patch" \
                "${cve//,/, }" "$res" "$reason" "$fun" "$bytes" "$secs" "${detail//|/\\|}"
        done < <(sorted_rows | tr '\t' '\037')
        echo
        awk -F'\t' '{c[$4]++} END {for (k in c) printf "- %s: %d\n", k, c[k]}' "$RESULTS" | sort
    } >"$md"
    echo "$md"
}

if [ "${1:-}" = "--table" ]; then
    table
    exit 0
fi

[ -x "$SUTURE" ] || { echo "no suture binary at $SUTURE (cargo build --release -p suture)" >&2; exit 1; }
if [ ! -f "$PB_WORK/keys/bench.key" ]; then
    "$SUTURE" keygen --name bench --out "$PB_WORK/keys" >/dev/null
fi

sel=("$@")
while read -r -u 4 pkg patch cve; do
    case "$pkg" in ''|'#'*) continue ;; esac
    if [ ${#sel[@]} -gt 0 ]; then
        hit=""
        for s in "${sel[@]}"; do
            [ "$s" = "$pkg" ] || [ "$s" = "$pkg/$patch" ] && hit=1
        done
        [ -z "$hit" ] && continue
    fi
    run_fix "$pkg" "$patch" "$cve" </dev/null
done 4<"$HERE/fixes.txt"
table
