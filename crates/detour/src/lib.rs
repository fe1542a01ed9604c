//! The detour: a 5-byte `jmp rel32` written over a function's first bytes so that every new call
//! lands in the replacement.
//!
//! Both the bundler (on the deployed binary) and the engine (on the running bytes) ask the same
//! question before placing one: are the first five bytes the function's own to overwrite? They are
//! not when the function is shorter than the jump, or when any instruction of the function branches
//! back into those bytes (a loop head at the entry): a thread would later jump into the middle of
//! our `jmp` and execute garbage.

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction};

/// Length of `jmp rel32` (opcode `e9` + 32-bit displacement).
pub const DETOUR_LEN: usize = 5;

/// Why a function's entry cannot take a detour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SiteError {
    #[error("function is {size} bytes, shorter than the {DETOUR_LEN}-byte detour")]
    TooShort { size: u64 },
    #[error("instruction at {from:#x} branches to {to:#x}, inside the detour's first {DETOUR_LEN} bytes")]
    BranchIntoEntry { from: u64, to: u64 },
    #[error("detour from {from:#x} cannot reach {to:#x}: farther than ±2 GiB")]
    OutOfReach { from: u64, to: u64 },
}

/// Checks that `code` (the whole function, loaded at `address`) can be entered by a detour.
pub fn check_site(address: u64, code: &[u8]) -> Result<(), SiteError> {
    if code.len() < DETOUR_LEN {
        return Err(SiteError::TooShort {
            size: code.len() as u64,
        });
    }
    let entry_end = address + DETOUR_LEN as u64;
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        if insn.is_invalid() {
            // Data or padding inside the symbol's extent: nothing more we can learn from it.
            break;
        }
        let branches = matches!(
            insn.flow_control(),
            FlowControl::UnconditionalBranch
                | FlowControl::ConditionalBranch
                | FlowControl::Call
                | FlowControl::XbeginXabortXend
        );
        if branches {
            let to = insn.near_branch_target();
            if to > address && to < entry_end {
                return Err(SiteError::BranchIntoEntry {
                    from: insn.ip(),
                    to,
                });
            }
        }
    }
    Ok(())
}

/// Encodes `jmp rel32` placed at `from` that lands on `to`.
pub fn encode_jmp(from: u64, to: u64) -> Result<[u8; DETOUR_LEN], SiteError> {
    let next = from.wrapping_add(DETOUR_LEN as u64);
    let rel = (to as i128) - (next as i128);
    let rel = i32::try_from(rel).map_err(|_| SiteError::OutOfReach { from, to })?;
    let d = rel.to_le_bytes();
    Ok([0xe9, d[0], d[1], d[2], d[3]])
}

/// The target of a `jmp rel32` at `from`, if `bytes` start with one.
pub fn decode_jmp(from: u64, bytes: &[u8]) -> Option<u64> {
    match bytes {
        [0xe9, a, b, c, d, ..] => {
            let rel = i32::from_le_bytes([*a, *b, *c, *d]) as i64;
            Some(
                from.wrapping_add(DETOUR_LEN as u64)
                    .wrapping_add(rel as u64),
            )
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jmp_round_trips_both_directions() {
        for (from, to) in [(0x1000u64, 0x2000u64), (0x7f00_0000_0000, 0x7eff_ffff_0000)] {
            let j = encode_jmp(from, to).expect("in reach");
            assert_eq!(j[0], 0xe9);
            assert_eq!(decode_jmp(from, &j), Some(to));
        }
    }

    #[test]
    fn far_target_is_refused() {
        assert!(matches!(
            encode_jmp(0x1000, 0x1_0000_0000),
            Err(SiteError::OutOfReach { .. })
        ));
    }

    #[test]
    fn short_function_is_refused() {
        // xor eax,eax; ret
        assert_eq!(
            check_site(0x1000, &[0x31, 0xc0, 0xc3]),
            Err(SiteError::TooShort { size: 3 })
        );
    }

    #[test]
    fn loop_back_into_entry_is_refused() {
        // 0x1000: inc eax (2) ; 0x1002: cmp eax,10 (3) ; 0x1005: jne 0x1000+2? -> jne rel8 to 0x1002
        let code = [0xff, 0xc0, 0x83, 0xf8, 0x0a, 0x75, 0xfb, 0xc3];
        assert!(matches!(
            check_site(0x1000, &code),
            Err(SiteError::BranchIntoEntry { to: 0x1002, .. })
        ));
    }

    #[test]
    fn branch_to_entry_itself_is_fine() {
        // 0x1000: inc eax; cmp eax,10; jne 0x1000; ret
        let code = [0xff, 0xc0, 0x83, 0xf8, 0x0a, 0x75, 0xf9, 0xc3];
        assert_eq!(check_site(0x1000, &code), Ok(()));
    }
}
