//! Inputs the fuzzer (fuzz/, target elf_module) found to crash the reader, rebuilt by hand
//! as the smallest ELF that shows each bug: each must now be an answer, not a panic.

use suture_module::*;

/// A 64-bit little-endian x86-64 ET_DYN header followed by `phdrs` program headers
/// (p_type, p_offset, p_vaddr, p_filesz, p_memsz), then `tail` bytes of zeros.
fn elf(phdrs: &[(u32, u64, u64, u64, u64)], tail: usize) -> Vec<u8> {
    let mut d = vec![0u8; 64];
    d[..4].copy_from_slice(b"\x7fELF");
    d[4] = 2; // ELFCLASS64
    d[5] = 1; // little-endian
    d[6] = 1; // EV_CURRENT
    d[16..18].copy_from_slice(&3u16.to_le_bytes()); // ET_DYN
    d[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    d[20..24].copy_from_slice(&1u32.to_le_bytes());
    d[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    d[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    d[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    d[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
    for &(p_type, offset, vaddr, filesz, memsz) in phdrs {
        let mut ph = [0u8; 56];
        ph[..4].copy_from_slice(&p_type.to_le_bytes());
        ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // PF_R | PF_X
        ph[8..16].copy_from_slice(&offset.to_le_bytes());
        ph[16..24].copy_from_slice(&vaddr.to_le_bytes());
        ph[24..32].copy_from_slice(&vaddr.to_le_bytes());
        ph[32..40].copy_from_slice(&filesz.to_le_bytes());
        ph[40..48].copy_from_slice(&memsz.to_le_bytes());
        ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
        d.extend_from_slice(&ph);
    }
    d.resize(d.len() + tail, 0);
    d
}

const PT_LOAD: u32 = 1;

/// crash-bc47ef87…: a PT_LOAD whose vaddr + filesz passes 2^64 made `bytes_from` overflow.
#[test]
fn bytes_from_a_segment_past_the_end_of_the_address_space() {
    let top = u64::MAX - 0xfff;
    let data = elf(
        &[
            (PT_LOAD, 0, top, 0x2000, 0x2000),
            (PT_LOAD, 0, 0x1000, 0x100, 0x100),
        ],
        0x100,
    );
    let m = Module::parse(&data).unwrap();
    assert_eq!(m.bytes_from(top), None);
    assert_eq!(m.bytes_from(u64::MAX), None);
    // A sane segment after the broken one still answers.
    assert_eq!(m.bytes_from(0x10f0).map(<[u8]>::len), Some(0x10));
    let _ = m.vaddr_range();
}
