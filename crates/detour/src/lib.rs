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
///
/// Decodes with yaxpeax-x86 first: it needs no set-up, while iced-x86 builds its decoder tables
/// on first use (≈ 1 ms, more than the rest of a one-shot `suture apply`'s own work). Where
/// yaxpeax cannot decode an instruction (some AVX-512 mask and AMD XOP forms, data in the
/// function), iced — which decodes every x86-64 encoding — walks the whole function again and
/// decides. A test holds the two to the same instruction boundaries and verdicts on every
/// function of this system's libraries.
pub fn check_site(address: u64, code: &[u8]) -> Result<(), SiteError> {
    if code.len() < DETOUR_LEN {
        return Err(SiteError::TooShort {
            size: code.len() as u64,
        });
    }
    match walk_yaxpeax(address, code, &mut |_| {}) {
        Walk::Checked(verdict) => verdict,
        Walk::Undecodable => walk_iced(address, code, &mut |_| {}),
    }
}

/// The verdict of a branch found at `from` that lands on `to`.
fn branch(address: u64, from: u64, to: u64) -> Result<(), SiteError> {
    if to > address && to < address + DETOUR_LEN as u64 {
        return Err(SiteError::BranchIntoEntry { from, to });
    }
    Ok(())
}

/// How far a decoder got through a function.
enum Walk {
    Checked(Result<(), SiteError>),
    /// An instruction it cannot decode: another decoder must decide.
    Undecodable,
}

/// The reference walk: every instruction up to the end or to bytes that are no instruction
/// (data or padding inside the symbol's extent: nothing more can be learnt from them).
fn walk_iced(address: u64, code: &[u8], seen: &mut dyn FnMut(u64)) -> Result<(), SiteError> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        if insn.is_invalid() {
            break;
        }
        seen(insn.ip());
        let branches = matches!(
            insn.flow_control(),
            FlowControl::UnconditionalBranch
                | FlowControl::ConditionalBranch
                | FlowControl::Call
                | FlowControl::XbeginXabortXend
        );
        if branches {
            branch(address, insn.ip(), insn.near_branch_target())?;
        }
    }
    Ok(())
}

/// The quick walk. Near branches with a displacement are the only ones that can land inside
/// the function's first bytes; indirect ones (through a register or memory) are not knowable
/// here, for either decoder.
fn walk_yaxpeax(address: u64, code: &[u8], seen: &mut dyn FnMut(u64)) -> Walk {
    use yaxpeax_arch::LengthedInstruction;
    use yaxpeax_x86::long_mode::{InstDecoder, Opcode, Operand};
    let decoder = InstDecoder::default();
    let mut offset = 0usize;
    while offset < code.len() {
        let Ok(insn) = decoder.decode_slice(&code[offset..]) else {
            return Walk::Undecodable;
        };
        let ip = address + offset as u64;
        seen(ip);
        let len = insn.len().to_const();
        use Opcode::*;
        let relative = matches!(
            insn.opcode(),
            JMP | CALL
                | JO
                | JNO
                | JB
                | JNB
                | JZ
                | JNZ
                | JNA
                | JA
                | JS
                | JNS
                | JP
                | JNP
                | JL
                | JGE
                | JLE
                | JG
                | JRCXZ
                | JECXZ
                | LOOP
                | LOOPZ
                | LOOPNZ
                | XBEGIN
        );
        if relative && insn.operand_count() > 0 {
            let displacement = match insn.operand(0) {
                Operand::ImmediateI8 { imm } => Some(i64::from(imm)),
                Operand::ImmediateI16 { imm } => Some(i64::from(imm)),
                Operand::ImmediateI32 { imm } => Some(i64::from(imm)),
                _ => None,
            };
            if let Some(d) = displacement {
                let to = ip.wrapping_add(len).wrapping_add(d as u64);
                if let Err(e) = branch(address, ip, to) {
                    return Walk::Checked(Err(e));
                }
            }
        }
        offset += len as usize;
    }
    Walk::Checked(Ok(()))
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

    /// AMD XOP `vprotb xmm5, xmm4, 0xe` (`8f e8 78 c2 ec 0e`): yaxpeax cannot decode it, iced
    /// can. A loop back into the entry after it must still be found.
    #[test]
    fn a_branch_after_an_instruction_only_iced_decodes_is_still_found() {
        let mut code = vec![0x90; 5];
        code.extend([0x8f, 0xe8, 0x78, 0xc2, 0xec, 0x0e]);
        code.extend([0x75, 0xf5]); // jne 0x1002
        code.push(0xc3);
        assert!(matches!(
            walk_yaxpeax(0x1000, &code, &mut |_| {}),
            Walk::Undecodable
        ));
        assert_eq!(
            check_site(0x1000, &code),
            Err(SiteError::BranchIntoEntry {
                from: 0x100b,
                to: 0x1002
            })
        );
    }

    #[test]
    fn rel32_calls_and_xbegin_into_the_entry_are_refused() {
        // nop x5; call 0x1001; ret
        let call = [
            0x90, 0x90, 0x90, 0x90, 0x90, 0xe8, 0xf7, 0xff, 0xff, 0xff, 0xc3,
        ];
        assert!(matches!(
            check_site(0x1000, &call),
            Err(SiteError::BranchIntoEntry { to: 0x1001, .. })
        ));
        // nop x5; xbegin 0x1003; ret
        let xbegin = [
            0x90, 0x90, 0x90, 0x90, 0x90, 0xc7, 0xf8, 0xf8, 0xff, 0xff, 0xff, 0xc3,
        ];
        assert!(matches!(
            check_site(0x1000, &xbegin),
            Err(SiteError::BranchIntoEntry { to: 0x1003, .. })
        ));
    }

    /// Encodings compilers rarely emit: an operand-size prefix on near branches (ignored in
    /// 64-bit mode), `jrcxz`, `loop`. Both decoders must see the same instructions.
    #[test]
    fn both_decoders_agree_on_prefixed_and_rare_branches() {
        let cases: [&[u8]; 6] = [
            &[
                0x90, 0x90, 0x90, 0x90, 0x90, 0x66, 0xe9, 0x10, 0x00, 0x00, 0x00, 0xc3,
            ],
            &[
                0x90, 0x90, 0x90, 0x90, 0x90, 0x66, 0xe8, 0xf6, 0xff, 0xff, 0xff, 0xc3,
            ],
            &[
                0x90, 0x90, 0x90, 0x90, 0x90, 0x66, 0x0f, 0x85, 0xf5, 0xff, 0xff, 0xff,
            ],
            &[0x90, 0x90, 0x90, 0x90, 0x90, 0x66, 0x75, 0xf9, 0xc3],
            &[0x90, 0x90, 0x90, 0x90, 0x90, 0xe3, 0xfa, 0xc3],
            &[0x90, 0x90, 0x90, 0x90, 0x90, 0xe2, 0xfb, 0xc3],
        ];
        for (i, code) in cases.into_iter().enumerate() {
            let (mut quick, mut reference) = (Vec::new(), Vec::new());
            let Walk::Checked(verdict) = walk_yaxpeax(0x1000, code, &mut |ip| quick.push(ip))
            else {
                panic!("{code:02x?}: yaxpeax cannot decode it");
            };
            assert_eq!(
                verdict,
                walk_iced(0x1000, code, &mut |ip| reference.push(ip)),
                "{code:02x?}"
            );
            assert_eq!(quick, reference, "{code:02x?}");
            // All but the first branch back into the entry's bytes.
            assert_eq!(verdict.is_err(), i > 0, "{code:02x?}");
        }
    }

    /// Every function symbol of this machine's shared libraries: both decoders walk the same
    /// instructions and reach the same verdict wherever the quick one decodes the whole function.
    #[test]
    fn both_decoders_agree_on_every_function_of_the_system_libraries() {
        use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
        let mut libraries: Vec<_> = std::fs::read_dir("/usr/lib/x86_64-linux-gnu")
            .expect("list /usr/lib/x86_64-linux-gnu")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().contains(".so"))
            .filter(|p| !p.is_symlink())
            .collect();
        libraries.sort();
        let (mut functions, mut refused, mut by_iced) = (0usize, 0usize, 0usize);
        for path in &libraries {
            let Ok(data) = std::fs::read(path) else {
                continue;
            };
            let Ok(file) = object::File::parse(&*data) else {
                continue;
            };
            let mut addresses = std::collections::HashSet::new();
            for sym in file.symbols().chain(file.dynamic_symbols()) {
                if sym.kind() != SymbolKind::Text || sym.size() < DETOUR_LEN as u64 {
                    continue;
                }
                if !addresses.insert(sym.address()) {
                    continue;
                }
                let Some(code) = sym
                    .section_index()
                    .and_then(|i| file.section_by_index(i).ok())
                    .and_then(|s| s.data_range(sym.address(), sym.size()).ok().flatten())
                else {
                    continue;
                };
                let (mut quick, mut reference) = (Vec::new(), Vec::new());
                let walk = walk_yaxpeax(sym.address(), code, &mut |ip| quick.push(ip));
                let verdict = walk_iced(sym.address(), code, &mut |ip| reference.push(ip));
                functions += 1;
                refused += usize::from(verdict.is_err());
                match walk {
                    Walk::Undecodable => by_iced += 1,
                    Walk::Checked(v) => {
                        let name = sym.name().unwrap_or("?");
                        assert_eq!(v, verdict, "{} `{name}`", path.display());
                        assert_eq!(quick, reference, "{} `{name}`", path.display());
                    }
                }
            }
        }
        eprintln!(
            "{} libraries, {functions} functions: {refused} refused, {by_iced} decided by iced alone",
            libraries.len()
        );
        assert!(functions > 5_000, "only {functions} functions found");
    }
}
