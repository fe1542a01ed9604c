//! Choosing where patch memory goes: a free range close enough to the module that a 5-byte
//! `jmp rel32` from any detour reaches any replacement, and that a `rip`-relative reference from
//! the patch reaches any of the module's code and data.

use crate::procfs::Mapping;

const PAGE: u64 = 4096;
/// Keep a margin under the ±2 GiB reach of a rel32.
const REACH: u64 = (1 << 31) - (16 << 20);
const LOWEST: u64 = 1 << 20;
const HIGHEST: u64 = 0x7fff_ffff_0000;
/// Leave this much room after `[heap]` so the patch never stands in the way of `brk`.
const BRK_ROOM: u64 = 1 << 30;

/// Candidate base addresses for `size` bytes, best first (closest to the module).
/// `low` asks for memory below 2 GiB (the patch has absolute 32-bit relocations).
pub fn candidates(
    maps: &[Mapping],
    module_lo: u64,
    module_hi: u64,
    size: u64,
    low: bool,
) -> Vec<u64> {
    let mut win_lo = module_hi.saturating_sub(REACH).max(LOWEST);
    let mut win_hi = module_lo.saturating_add(REACH).min(HIGHEST);
    if low {
        win_lo = win_lo.max(LOWEST);
        win_hi = win_hi.min(1 << 31);
    }
    let mut used: Vec<(u64, u64)> = maps.iter().map(|m| (m.start, m.end)).collect();
    if let Some(heap) = maps.iter().find(|m| m.path == "[heap]") {
        used.push((heap.end, heap.end.saturating_add(BRK_ROOM)));
    }
    used.sort_unstable();

    let mut out = Vec::new();
    let mut cursor = 0u64;
    let mut gaps = Vec::new();
    for &(s, e) in &used {
        if s > cursor {
            gaps.push((cursor, s));
        }
        cursor = cursor.max(e);
    }
    gaps.push((cursor, u64::MAX));
    for (g0, g1) in gaps {
        // One unmapped guard page on each side.
        let lo = g0.saturating_add(PAGE).max(win_lo);
        let hi = g1.saturating_sub(PAGE).min(win_hi);
        if hi <= lo || hi - lo < size {
            continue;
        }
        // The end nearest the module.
        let base = if hi <= module_lo {
            (hi - size) & !(PAGE - 1)
        } else {
            lo.div_ceil(PAGE) * PAGE
        };
        if base >= lo && base + size <= hi {
            out.push(base);
        }
    }
    out.sort_by_key(|&b| {
        if b + size <= module_lo {
            module_lo - (b + size)
        } else {
            b.saturating_sub(module_hi)
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(start: u64, end: u64, path: &str) -> Mapping {
        Mapping {
            start,
            end,
            readable: true,
            writable: false,
            executable: false,
            offset: 0,
            dev: "00:00".into(),
            inode: 0,
            path: path.into(),
        }
    }

    #[test]
    fn prefers_just_below_a_pie() {
        let maps = vec![
            map(0x5555_5555_4000, 0x5555_5555_9000, "/bin/x"),
            map(0x5555_5556_0000, 0x5555_5558_1000, "[heap]"),
            map(0x7fff_f7dd_0000, 0x7fff_f7ff_0000, "/lib/libc.so.6"),
        ];
        let c = candidates(&maps, 0x5555_5555_4000, 0x5555_5555_9000, 0x3000, false);
        assert_eq!(c[0], 0x5555_5555_4000 - PAGE - 0x3000);
    }

    #[test]
    fn never_right_after_the_heap_and_stays_in_reach() {
        let maps = vec![
            map(0x10000, 0x401000, "/bin/x"),
            map(0x401000, 0x402000, "/bin/x"),
            map(0x500000, 0x600000, "[heap]"),
        ];
        for b in candidates(&maps, 0x10000, 0x402000, 0x2000, false) {
            assert!(!(0x600000..0x600000 + BRK_ROOM).contains(&b));
            assert!(b + 0x2000 < 0x10000 + REACH);
        }
        for b in candidates(&maps, 0x10000, 0x402000, 0x2000, true) {
            assert!(b + 0x2000 <= 1 << 31);
        }
    }
}
