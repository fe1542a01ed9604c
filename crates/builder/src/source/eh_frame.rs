//! The unwind tables (`.eh_frame`) of an object file, record by record, so the patch can carry
//! the entries of exactly the functions it carries: without them an exception (or a thread
//! cancellation) that reaches patch code cannot unwind and the process is terminated.
//!
//! `.eh_frame` is a sequence of length-prefixed records: CIEs (common information, with the
//! personality routine) and FDEs (one per function part, pointing at their CIE, at the code,
//! and at the function's exception table, its LSDA, in `.gcc_except_table.*`). In an object
//! file the pointers are relocations; offsets between records are plain numbers, so a filtered
//! copy must rewrite each FDE's CIE pointer.

use anyhow::{bail, Context, Result};
use object::read::elf::ElfFile64;
use object::{
    Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, SectionIndex,
    SymbolIndex,
};

/// A relocation inside `.eh_frame`.
#[derive(Debug, Clone)]
pub struct Reloc {
    pub offset: u64,
    pub r_type: u32,
    pub symbol: SymbolIndex,
    pub addend: i64,
}

#[derive(Debug, Clone)]
pub struct Record {
    /// Offset of the record (its length field) in `.eh_frame`.
    pub offset: u64,
    pub bytes: Vec<u8>,
    /// For an FDE, the offset of its CIE; `None` for a CIE.
    pub cie: Option<u64>,
    /// The section of the code an FDE describes.
    pub code: Option<SectionIndex>,
    /// Other sections the record points into (the LSDA; for a CIE, none that are sections).
    pub refers_to: Vec<SectionIndex>,
    pub relocs: Vec<Reloc>,
}

/// The `.eh_frame` section of an object and its records; `None` if it has none.
pub fn read(file: &ElfFile64<'_>) -> Result<Option<(SectionIndex, Vec<Record>)>> {
    let Some(sec) = file.section_by_name(".eh_frame") else {
        return Ok(None);
    };
    let data = sec.data().context("reading .eh_frame")?;
    let mut relocs: Vec<Reloc> = Vec::new();
    for (offset, r) in sec.relocations() {
        let (RelocationFlags::Elf { r_type }, RelocationTarget::Symbol(symbol)) =
            (r.flags(), r.target())
        else {
            bail!(".eh_frame has a relocation we cannot read");
        };
        relocs.push(Reloc {
            offset,
            r_type,
            symbol,
            addend: r.addend(),
        });
    }
    let section_of = |s: SymbolIndex| file.symbol_by_index(s).ok().and_then(|s| s.section_index());
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
    };
    let mut records = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let len = word(at).context(".eh_frame is truncated")? as usize;
        if len == 0 {
            break; // terminator
        }
        if len == 0xffff_ffff {
            bail!(".eh_frame uses 64-bit records, which gcc does not emit");
        }
        let end = at
            .checked_add(4 + len)
            .filter(|&e| e <= data.len())
            .context(".eh_frame record runs past the section")?;
        let id = word(at + 4).context(".eh_frame record without id")?;
        let cie = (id != 0)
            .then(|| (at as u64 + 4).checked_sub(u64::from(id)))
            .map(|c| c.context(".eh_frame FDE points before the section"))
            .transpose()?;
        let mine: Vec<Reloc> = relocs
            .iter()
            .filter(|r| r.offset >= at as u64 && r.offset < end as u64)
            .map(|r| Reloc {
                offset: r.offset - at as u64,
                ..r.clone()
            })
            .collect();
        // An FDE's first pointer (after length and CIE pointer) is the code it covers.
        let code = cie.and(
            mine.iter()
                .find(|r| r.offset == 8)
                .and_then(|r| section_of(r.symbol)),
        );
        let refers_to = mine
            .iter()
            .filter(|r| r.offset != 8 || cie.is_none())
            .filter_map(|r| section_of(r.symbol))
            .collect();
        records.push(Record {
            offset: at as u64,
            bytes: data[at..end].to_vec(),
            cie,
            code,
            refers_to,
            relocs: mine,
        });
        at = end;
    }
    Ok(Some((sec.index(), records)))
}

/// The records describing code in `kept` sections, with the CIEs they use, laid out anew
/// (CIEs first, so every CIE pointer points back): the bytes and the relocations at their new
/// offsets. The linker adds the terminator.
pub fn filter(records: &[Record], kept: impl Fn(SectionIndex) -> bool) -> (Vec<u8>, Vec<Reloc>) {
    let fdes: Vec<&Record> = records
        .iter()
        .filter(|r| r.cie.is_some() && r.code.is_some_and(&kept))
        .collect();
    let cies = records
        .iter()
        .filter(|r| r.cie.is_none() && fdes.iter().any(|f| f.cie == Some(r.offset)));
    let mut out = Vec::new();
    let mut relocs = Vec::new();
    let mut new_offset = std::collections::HashMap::new();
    for r in cies.chain(fdes.iter().copied()) {
        let at = out.len() as u64;
        new_offset.insert(r.offset, at);
        let mut bytes = r.bytes.clone();
        if let Some(cie) = r.cie.and_then(|c| new_offset.get(&c)) {
            // The CIE pointer is the distance back from this field to the CIE.
            let id = (at + 4 - cie) as u32;
            bytes[4..8].copy_from_slice(&id.to_le_bytes());
        }
        out.extend_from_slice(&bytes);
        relocs.extend(r.relocs.iter().map(|x| Reloc {
            offset: at + x.offset,
            ..x.clone()
        }));
    }
    (out, relocs)
}
