//! The patch linker: lays out a patch's ELF relocatable object (x86-64, as gcc emits it) for an
//! address in the target process and applies its relocations, producing the exact bytes to put
//! there. Pure computation: no process is touched here.
//!
//! Layout: read-only data with the GOT, then text (R-X) with a small PLT after it, then
//! read-write data and bss, each page-aligned so each gets its own protection. Read-only data
//! comes first so that it joins whatever read-only memory precedes the image (the engine's
//! patch record) in one run of pages: one `mprotect` fewer in the target. The GOT is
//! read-only because every address it holds is known before the patch is mapped: nothing ever
//! needs to write it at run time, so nothing can redirect it either.
//!
//! Far targets: a `call`/`jmp` (`R_X86_64_PLT32`) to a symbol out of `rel32` reach goes through a
//! PLT stub `jmp *GOT(%rip)`; `GOTPCREL` loads go through the GOT; other out-of-reach references
//! are refused with the reason (compile the patch with `-fPIC`).

use std::collections::HashMap;

use object::elf;
use object::read::elf::{FileHeader, Rela, SectionHeader, Sym};
use object::{Endianness, SymbolIndex};

pub const PAGE_SIZE: u64 = 4096;
/// Largest image we lay out: a live patch is a few functions, and a corrupt `.bss` size must
/// not become a huge allocation.
pub const MAX_IMAGE: u64 = 256 << 20;
const PLT_STUB: u64 = 16;

type Header = elf::FileHeader64<Endianness>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("not an x86-64 ELF relocatable object: {0}")]
    NotObject(String),
    #[error("malformed object: {0}")]
    Malformed(String),
    #[error("patch object has constructors/destructors ({0}): not supported in a live patch")]
    Constructors(String),
    #[error("patch defines thread-local storage ({0}): not supported in a live patch")]
    DefinesTls(String),
    #[error("unresolved symbol `{0}`")]
    Unresolved(String),
    #[error("unsupported relocation {kind} against `{symbol}` in {section} at {offset:#x}")]
    Unsupported {
        kind: String,
        symbol: String,
        section: String,
        offset: u64,
    },
    #[error("relocation overflow: {kind} against `{symbol}` in {section} at {offset:#x} (value {value:#x}){hint}")]
    Overflow {
        kind: String,
        symbol: String,
        section: String,
        offset: u64,
        value: i128,
        hint: &'static str,
    },
    #[error("`{symbol}` is thread-local but used by {kind} in {section}, or the reverse")]
    TlsMismatch {
        kind: String,
        symbol: String,
        section: String,
    },
}

fn malformed(e: object::Error) -> LinkError {
    LinkError::Malformed(e.to_string())
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Resolved {
    Address(u64),
    /// Thread-local: offset from the thread pointer (%fs).
    TpOffset(i64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prot {
    ReadExecute,
    Read,
    ReadWrite,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
    pub prot: Prot,
}

pub struct Image {
    pub bytes: Vec<u8>,
    pub segments: Vec<Segment>,
    /// Absolute address of every defined function/object symbol.
    pub symbols: HashMap<String, u64>,
    /// Absolute address of the unwind tables (`.eh_frame`, zero-terminated), if any.
    pub eh_frame: Option<u64>,
}

#[derive(Clone, Debug)]
struct Reloc {
    offset: u64,
    kind: u32,
    sym: usize,
    addend: i64,
}

#[derive(Clone, Debug)]
struct Section {
    name: String,
    offset: u64,
    size: u64,
    /// None for SHT_NOBITS.
    bytes: Option<Vec<u8>>,
    relocs: Vec<Reloc>,
}

#[derive(Clone, Debug)]
enum Place {
    /// In loaded section `n` at value.
    Section(usize, u64),
    /// Allocated COMMON symbol at image offset.
    Common(u64),
    Absolute(u64),
    /// `_GLOBAL_OFFSET_TABLE_`: defined by the linker, the start of our GOT.
    GotBase,
    Undefined {
        weak: bool,
    },
    /// Defined in a section we do not load.
    NotLoaded,
}

#[derive(Clone, Debug)]
struct ObjSym {
    name: String,
    place: Place,
    /// Function/object/notype symbol with a name (not a section or file symbol).
    named: bool,
}

pub struct Plan {
    sections: Vec<Section>,
    symbols: Vec<ObjSym>,
    got: HashMap<usize, u64>,
    /// Image offset where the GOT starts (also without slots, for GOTOFF/GOTPC references).
    got_offset: Option<u64>,
    plt: HashMap<usize, u64>,
    segments: Vec<Segment>,
    size: u64,
    undefined: Vec<String>,
    needs_low: bool,
    /// Image offset of the unwind tables (`.eh_frame`, zero-terminated), if the object has them.
    eh_frame: Option<u64>,
    /// GOT slots for `lea` of external data that may be out of reach, by (symbol, addend).
    lea_got: HashMap<(usize, i64), u64>,
}

/// Whether the 4 bytes at `offset` are the displacement of `lea disp32(%rip), %r64`
/// (REX.W, opcode 0x8d, ModRM with mod 00 and r/m 101).
fn is_rip_lea64(data: &[u8], offset: u64) -> bool {
    let Some(at) = usize::try_from(offset).ok().filter(|&o| o >= 3) else {
        return false;
    };
    matches!(data.get(at - 3..at), Some(&[rex, 0x8d, modrm]) if rex & 0xf8 == 0x48 && modrm & 0xc7 == 0x05)
}

fn align_up(v: u64, a: u64) -> u64 {
    let a = a.max(1);
    v.div_ceil(a).saturating_mul(a)
}

fn reloc_name(kind: u32) -> String {
    let n = match kind {
        elf::R_X86_64_NONE => "R_X86_64_NONE",
        elf::R_X86_64_64 => "R_X86_64_64",
        elf::R_X86_64_PC32 => "R_X86_64_PC32",
        elf::R_X86_64_GOT32 => "R_X86_64_GOT32",
        elf::R_X86_64_PLT32 => "R_X86_64_PLT32",
        elf::R_X86_64_GOTPCREL => "R_X86_64_GOTPCREL",
        elf::R_X86_64_32 => "R_X86_64_32",
        elf::R_X86_64_32S => "R_X86_64_32S",
        elf::R_X86_64_TLSGD => "R_X86_64_TLSGD",
        elf::R_X86_64_TLSLD => "R_X86_64_TLSLD",
        elf::R_X86_64_DTPOFF32 => "R_X86_64_DTPOFF32",
        elf::R_X86_64_GOTTPOFF => "R_X86_64_GOTTPOFF",
        elf::R_X86_64_TPOFF32 => "R_X86_64_TPOFF32",
        elf::R_X86_64_PC64 => "R_X86_64_PC64",
        elf::R_X86_64_GOTOFF64 => "R_X86_64_GOTOFF64",
        elf::R_X86_64_GOTPC32 => "R_X86_64_GOTPC32",
        elf::R_X86_64_GOTPC64 => "R_X86_64_GOTPC64",
        elf::R_X86_64_GOTPCRELX => "R_X86_64_GOTPCRELX",
        elf::R_X86_64_REX_GOTPCRELX => "R_X86_64_REX_GOTPCRELX",
        elf::R_X86_64_DTPOFF64 => "R_X86_64_DTPOFF64",
        elf::R_X86_64_TLSDESC => "R_X86_64_TLSDESC",
        elf::R_X86_64_GOTPC32_TLSDESC => "R_X86_64_GOTPC32_TLSDESC",
        elf::R_X86_64_TLSDESC_CALL => "R_X86_64_TLSDESC_CALL",
        _ => return format!("relocation type {kind}"),
    };
    n.to_string()
}

fn uses_got(kind: u32) -> bool {
    matches!(
        kind,
        elf::R_X86_64_GOTPCREL
            | elf::R_X86_64_GOTPCRELX
            | elf::R_X86_64_REX_GOTPCRELX
            | elf::R_X86_64_GOTTPOFF
    )
}

impl Plan {
    pub fn new(object: &[u8]) -> Result<Plan, LinkError> {
        if object.len() < 64 || &object[..4] != b"\x7fELF" || object[4] != elf::ELFCLASS64 {
            return Err(LinkError::NotObject("not a 64-bit ELF file".into()));
        }
        let h = Header::parse(object).map_err(malformed)?;
        let endian = h.endian().map_err(malformed)?;
        if endian != Endianness::Little || h.e_machine(endian) != elf::EM_X86_64 {
            return Err(LinkError::NotObject("not little-endian x86-64".into()));
        }
        if h.e_type(endian) != elf::ET_REL {
            return Err(LinkError::NotObject(format!(
                "ELF type {} is not ET_REL (compile with -c)",
                h.e_type(endian)
            )));
        }
        let table = h.sections(endian, object).map_err(malformed)?;

        // Which sections to load, and where (offsets relative to the image start).
        let mut loaded_index: HashMap<usize, usize> = HashMap::new();
        let mut eh_frame_index = None;
        let mut by_class: [Vec<(usize, String, u64, u64)>; 3] =
            [Vec::new(), Vec::new(), Vec::new()];
        for (i, sh) in table.iter().enumerate() {
            let name = String::from_utf8_lossy(table.section_name(endian, sh).map_err(malformed)?)
                .into_owned();
            let flags = sh.sh_flags(endian);
            let ty = sh.sh_type(endian);
            if matches!(
                ty,
                elf::SHT_INIT_ARRAY | elf::SHT_FINI_ARRAY | elf::SHT_PREINIT_ARRAY
            ) || name.starts_with(".ctors")
                || name.starts_with(".dtors")
            {
                return Err(LinkError::Constructors(name));
            }
            if flags & u64::from(elf::SHF_ALLOC) == 0 {
                continue;
            }
            if flags & u64::from(elf::SHF_TLS) != 0 {
                return Err(LinkError::DefinesTls(name));
            }
            if ty == elf::SHT_NOTE || ty == elf::SHT_GROUP {
                continue;
            }
            let size = sh.sh_size(endian);
            if size == 0 {
                continue;
            }
            if ty == elf::SHT_X86_64_UNWIND || name == ".eh_frame" {
                // Unwind tables go with the read-only data; the engine registers them so
                // exceptions and thread cancellation can unwind through patch code.
                if eh_frame_index.replace(i).is_some() {
                    return Err(LinkError::Malformed("more than one .eh_frame".into()));
                }
                by_class[1].push((i, name, size, sh.sh_addralign(endian).max(1)));
                continue;
            }
            let class = if flags & u64::from(elf::SHF_EXECINSTR) != 0 {
                0
            } else if flags & u64::from(elf::SHF_WRITE) != 0 {
                2
            } else {
                1
            };
            by_class[class].push((i, name, size, sh.sh_addralign(endian).max(1)));
        }

        // Symbols.
        let symtab = table
            .symbols(endian, object, elf::SHT_SYMTAB)
            .map_err(malformed)?;
        let mut symbols = Vec::with_capacity(symtab.len());
        let mut commons: Vec<(usize, u64, u64)> = Vec::new();
        for (i, sym) in symtab.iter().enumerate() {
            let name = String::from_utf8_lossy(symtab.symbol_name(endian, sym).map_err(malformed)?)
                .into_owned();
            let shndx = sym.st_shndx(endian);
            let st_type = sym.st_type();
            if st_type == elf::STT_TLS && shndx != elf::SHN_UNDEF {
                return Err(LinkError::DefinesTls(name));
            }
            let section_index = if shndx == elf::SHN_XINDEX {
                symtab.shndx(endian, SymbolIndex(i)).map(|x| x as usize)
            } else {
                Some(shndx as usize)
            };
            let place = match shndx {
                // Symbol 0 (and any nameless undefined one) is the null symbol: value 0.
                elf::SHN_UNDEF if name.is_empty() => Place::Absolute(0),
                elf::SHN_UNDEF if name == "_GLOBAL_OFFSET_TABLE_" => Place::GotBase,
                elf::SHN_UNDEF => Place::Undefined {
                    weak: sym.st_bind() == elf::STB_WEAK,
                },
                elf::SHN_ABS => Place::Absolute(sym.st_value(endian)),
                elf::SHN_COMMON => {
                    commons.push((i, sym.st_size(endian), sym.st_value(endian).max(1)));
                    Place::Common(0)
                }
                _ => match section_index {
                    Some(s) if shndx < elf::SHN_LORESERVE || shndx == elf::SHN_XINDEX => {
                        Place::Section(s, sym.st_value(endian))
                    }
                    _ => Place::NotLoaded,
                },
            };
            let named = !name.is_empty() && !matches!(st_type, elf::STT_SECTION | elf::STT_FILE);
            symbols.push(ObjSym { name, place, named });
        }

        // Relocations, per loaded section.
        let mut relocs: HashMap<usize, Vec<Reloc>> = HashMap::new();
        for sh in table.iter() {
            match sh.sh_type(endian) {
                elf::SHT_REL => {
                    return Err(LinkError::Malformed(
                        "SHT_REL relocations are not used on x86-64".into(),
                    ))
                }
                elf::SHT_RELA => {}
                _ => continue,
            }
            let target = sh.sh_info(endian) as usize;
            let Some((rela, _)) = sh.rela(endian, object).map_err(malformed)? else {
                continue;
            };
            let list = relocs.entry(target).or_default();
            for r in rela {
                list.push(Reloc {
                    offset: r.r_offset(endian),
                    kind: r.r_type(endian, false),
                    sym: r.r_sym(endian, false) as usize,
                    addend: r.r_addend(endian),
                });
            }
        }

        // GOT slots and PLT stubs we may need.
        let mut got_syms: Vec<usize> = Vec::new();
        let mut plt_syms: Vec<usize> = Vec::new();
        let mut needs_low = false;
        // `lea sym(%rip)` of external data: if the data lies out of reach, the lea becomes a
        // load of the address from a GOT slot (the reverse of the linker's GOTPCRELX relaxation).
        let mut far_leas: Vec<(usize, i64)> = Vec::new();
        let mut referenced = vec![false; symbols.len()];
        for (class_list, _) in by_class.iter().zip(0..) {
            for (i, ..) in class_list {
                for r in relocs.get(i).map(Vec::as_slice).unwrap_or(&[]) {
                    let sym = symbols.get(r.sym).ok_or_else(|| {
                        LinkError::Malformed(format!(
                            "relocation names symbol {} of {}",
                            r.sym,
                            symbols.len()
                        ))
                    })?;
                    referenced[r.sym] = true;
                    if uses_got(r.kind) && !got_syms.contains(&r.sym) {
                        got_syms.push(r.sym);
                    }
                    if r.kind == elf::R_X86_64_PLT32
                        && matches!(sym.place, Place::Undefined { .. })
                        && !plt_syms.contains(&r.sym)
                    {
                        plt_syms.push(r.sym);
                        if !got_syms.contains(&r.sym) {
                            got_syms.push(r.sym);
                        }
                    }
                    if matches!(r.kind, elf::R_X86_64_32 | elf::R_X86_64_32S) {
                        needs_low = true;
                    }
                    if r.kind == elf::R_X86_64_PC32
                        && matches!(sym.place, Place::Undefined { .. })
                        && !far_leas.contains(&(r.sym, r.addend))
                    {
                        let sh = table.section(object::SectionIndex(*i)).map_err(malformed)?;
                        if sh.sh_type(endian) != elf::SHT_NOBITS
                            && is_rip_lea64(sh.data(endian, object).map_err(malformed)?, r.offset)
                        {
                            far_leas.push((r.sym, r.addend));
                        }
                    }
                }
            }
        }

        // Layout.
        let mut sections = Vec::new();
        let mut segments = Vec::new();
        let mut cursor = 0u64;
        let mut got = HashMap::new();
        let mut got_offset = None;
        let mut plt = HashMap::new();
        let mut lea_got = HashMap::new();
        let mut eh_frame = None;
        for class in [1, 0, 2] {
            let list = &by_class[class];
            let start = cursor;
            for (i, name, size, align) in list {
                cursor = align_up(cursor, *align);
                let sh = table.section(object::SectionIndex(*i)).map_err(malformed)?;
                let bytes = if sh.sh_type(endian) == elf::SHT_NOBITS {
                    None
                } else {
                    let d = sh.data(endian, object).map_err(malformed)?;
                    if d.len() as u64 != *size {
                        return Err(LinkError::Malformed(format!("section {name} is truncated")));
                    }
                    Some(d.to_vec())
                };
                // The unwinder reads `.eh_frame` until a zero-length record.
                let (bytes, size) = match (eh_frame_index == Some(*i), bytes) {
                    (true, Some(mut b)) => {
                        eh_frame = Some(cursor);
                        b.extend_from_slice(&[0; 4]);
                        (Some(b), size + 4)
                    }
                    (_, bytes) => (bytes, *size),
                };
                loaded_index.insert(*i, sections.len());
                sections.push(Section {
                    name: name.clone(),
                    offset: cursor,
                    size,
                    bytes,
                    relocs: relocs.remove(i).unwrap_or_default(),
                });
                cursor = cursor
                    .checked_add(size)
                    .ok_or_else(|| LinkError::Malformed("section sizes overflow".into()))?;
            }
            match class {
                0 => {
                    cursor = align_up(cursor, PLT_STUB);
                    for s in &plt_syms {
                        plt.insert(*s, cursor);
                        cursor += PLT_STUB;
                    }
                }
                1 => {
                    cursor = align_up(cursor, 8);
                    got_offset = Some(cursor);
                    for s in &got_syms {
                        got.insert(*s, cursor);
                        cursor += 8;
                    }
                    for key in &far_leas {
                        lea_got.insert(*key, cursor);
                        cursor += 8;
                    }
                }
                _ => {
                    for (i, size, align) in &commons {
                        cursor = align_up(cursor, *align);
                        if let Some(s) = symbols.get_mut(*i) {
                            s.place = Place::Common(cursor);
                        }
                        cursor = cursor
                            .checked_add(*size)
                            .ok_or_else(|| LinkError::Malformed("common sizes overflow".into()))?;
                    }
                }
            }
            let end = align_up(cursor, PAGE_SIZE);
            if cursor > start {
                let prot = [Prot::ReadExecute, Prot::Read, Prot::ReadWrite][class];
                segments.push(Segment {
                    offset: start,
                    len: end - start,
                    prot,
                });
            }
            cursor = end;
        }
        if cursor > MAX_IMAGE {
            return Err(LinkError::Malformed(format!(
                "patch image of {cursor} bytes is larger than {MAX_IMAGE}"
            )));
        }
        // Symbols now point at loaded sections by our index.
        for s in &mut symbols {
            if let Place::Section(i, v) = s.place {
                s.place = match loaded_index.get(&i) {
                    Some(&li) => Place::Section(li, v),
                    None => Place::NotLoaded,
                };
            }
        }
        // An undefined symbol no loaded relocation uses needs no resolving (gas declares some).
        for (s, used) in symbols.iter_mut().zip(&referenced) {
            if !used && matches!(s.place, Place::Undefined { .. }) {
                s.place = Place::NotLoaded;
            }
        }
        let mut undefined: Vec<String> = symbols
            .iter()
            .filter(|s| matches!(s.place, Place::Undefined { .. }) && !s.name.is_empty())
            .map(|s| s.name.clone())
            .collect();
        undefined.sort();
        undefined.dedup();
        Ok(Plan {
            sections,
            symbols,
            got,
            got_offset,
            plt,
            segments,
            size: cursor,
            undefined,
            needs_low,
            eh_frame,
            lea_got,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the object carries unwind tables (`.eh_frame`).
    /// The image's segments (offsets from the image's start), as [`Plan::link`] lays them out
    /// wherever the image goes.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub fn has_eh_frame(&self) -> bool {
        self.eh_frame.is_some()
    }

    pub fn undefined_symbols(&self) -> &[String] {
        &self.undefined
    }

    pub fn defined_symbols(&self) -> Vec<String> {
        self.symbols
            .iter()
            .filter(|s| s.named && matches!(s.place, Place::Section(..) | Place::Common(_)))
            .map(|s| s.name.clone())
            .collect()
    }

    pub fn needs_low_address(&self) -> bool {
        self.needs_low
    }

    pub fn link(
        &self,
        base: u64,
        resolve: &dyn Fn(&str) -> Option<Resolved>,
    ) -> Result<Image, LinkError> {
        let size = usize::try_from(self.size)
            .map_err(|_| LinkError::Malformed("image too large".into()))?;
        let mut bytes = vec![0u8; size];
        for s in &self.sections {
            if let Some(b) = &s.bytes {
                let o = s.offset as usize;
                bytes[o..o + b.len()].copy_from_slice(b);
            }
        }
        let got_base = self.got_offset.map(|o| base + o).unwrap_or(base);
        // Symbol values (None: defined nowhere we can reach).
        let mut values: Vec<Option<Resolved>> = Vec::with_capacity(self.symbols.len());
        for s in &self.symbols {
            values.push(match s.place {
                Place::Section(i, v) => self
                    .sections
                    .get(i)
                    .map(|sec| Resolved::Address(base + sec.offset + v)),
                Place::Common(off) => Some(Resolved::Address(base + off)),
                Place::Absolute(v) => Some(Resolved::Address(v)),
                Place::GotBase => Some(Resolved::Address(got_base)),
                Place::Undefined { weak } => match resolve(&s.name) {
                    Some(r) => Some(r),
                    None if weak => Some(Resolved::Address(0)),
                    None => return Err(LinkError::Unresolved(s.name.clone())),
                },
                Place::NotLoaded => None,
            });
        }
        let name_of = |i: usize| {
            self.symbols
                .get(i)
                .map(|s| s.name.clone())
                .unwrap_or_default()
        };
        // GOT and PLT.
        for (&sym, &off) in &self.got {
            let v = match values.get(sym).copied().flatten() {
                Some(Resolved::Address(a)) => a,
                Some(Resolved::TpOffset(t)) => t as u64,
                None => return Err(LinkError::Unresolved(name_of(sym))),
            };
            bytes[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
        }
        for (&sym, &off) in &self.plt {
            let slot = base + self.got[&sym];
            let stub = base + off;
            let rel = (slot as i128 - (stub as i128 + 6)) as i32;
            let o = off as usize;
            bytes[o..o + 2].copy_from_slice(&[0xff, 0x25]);
            bytes[o + 2..o + 6].copy_from_slice(&rel.to_le_bytes());
            bytes[o + 6..o + PLT_STUB as usize].fill(0xcc);
        }
        // Relocations.
        for sec in &self.sections {
            for r in &sec.relocs {
                let p = base + sec.offset + r.offset;
                let symbol = name_of(r.sym);
                let kind = reloc_name(r.kind);
                let value = values.get(r.sym).copied().flatten();
                let fail_overflow = |v: i128, hint: &'static str| LinkError::Overflow {
                    kind: kind.clone(),
                    symbol: symbol.clone(),
                    section: sec.name.clone(),
                    offset: r.offset,
                    value: v,
                    hint,
                };
                let addr = |v: Option<Resolved>| -> Result<i128, LinkError> {
                    match v {
                        Some(Resolved::Address(a)) => Ok(a as i128),
                        Some(Resolved::TpOffset(_)) => Err(LinkError::TlsMismatch {
                            kind: kind.clone(),
                            symbol: symbol.clone(),
                            section: sec.name.clone(),
                        }),
                        None => Err(LinkError::Unresolved(symbol.clone())),
                    }
                };
                let a = r.addend as i128;
                let pi = p as i128;
                let (width, v): (usize, i128) = match r.kind {
                    elf::R_X86_64_NONE => continue,
                    elf::R_X86_64_64 => (8, addr(value)? + a),
                    elf::R_X86_64_PC64 => (8, addr(value)? + a - pi),
                    elf::R_X86_64_PC32 => {
                        let target = addr(value)?;
                        let v = target + a - pi;
                        if i32::try_from(v).is_ok() {
                            (4, v)
                        } else if let (Some(&slot), true) = (
                            self.lea_got.get(&(r.sym, r.addend)),
                            sec.bytes
                                .as_deref()
                                .is_some_and(|b| is_rip_lea64(b, r.offset)),
                        ) {
                            // lea → mov from a slot that holds what the lea computed.
                            let o = (sec.offset + r.offset) as usize;
                            bytes[o - 2] = 0x8b;
                            let computed = (target + a + 4) as u64;
                            let so = slot as usize;
                            bytes[so..so + 8].copy_from_slice(&computed.to_le_bytes());
                            (4, (base + slot) as i128 - 4 - pi)
                        } else {
                            return Err(fail_overflow(
                                v,
                                " (target beyond ±2 GiB: compile the patch with -fPIC)",
                            ));
                        }
                    }
                    elf::R_X86_64_PLT32 => {
                        let direct = addr(value)? + a - pi;
                        if i32::try_from(direct).is_ok() {
                            (4, direct)
                        } else if let Some(stub) = self.plt.get(&r.sym) {
                            (4, (base + stub) as i128 + a - pi)
                        } else {
                            return Err(fail_overflow(direct, ""));
                        }
                    }
                    elf::R_X86_64_32 => {
                        let v = addr(value)? + a;
                        if u32::try_from(v).is_err() {
                            return Err(fail_overflow(
                                v,
                                " (absolute 32-bit address: compile the patch with -fPIC)",
                            ));
                        }
                        (4, v)
                    }
                    elf::R_X86_64_32S => {
                        let v = addr(value)? + a;
                        if i32::try_from(v).is_err() {
                            return Err(fail_overflow(
                                v,
                                " (absolute 32-bit address: compile the patch with -fPIC)",
                            ));
                        }
                        (4, v)
                    }
                    elf::R_X86_64_GOTPCREL
                    | elf::R_X86_64_GOTPCRELX
                    | elf::R_X86_64_REX_GOTPCRELX
                    | elf::R_X86_64_GOTTPOFF => {
                        let is_tls = matches!(value, Some(Resolved::TpOffset(_)));
                        if is_tls != (r.kind == elf::R_X86_64_GOTTPOFF) {
                            return Err(LinkError::TlsMismatch {
                                kind,
                                symbol,
                                section: sec.name.clone(),
                            });
                        }
                        let slot = self
                            .got
                            .get(&r.sym)
                            .map(|o| base + o)
                            .ok_or_else(|| LinkError::Malformed("missing GOT slot".into()))?;
                        (4, slot as i128 + a - pi)
                    }
                    elf::R_X86_64_TPOFF32 => match value {
                        Some(Resolved::TpOffset(t)) => (4, t as i128 + a),
                        _ => {
                            return Err(LinkError::TlsMismatch {
                                kind,
                                symbol,
                                section: sec.name.clone(),
                            })
                        }
                    },
                    elf::R_X86_64_GOTOFF64 => (8, addr(value)? + a - got_base as i128),
                    elf::R_X86_64_GOTPC32 => (4, got_base as i128 + a - pi),
                    elf::R_X86_64_GOTPC64 => (8, got_base as i128 + a - pi),
                    _ => {
                        return Err(LinkError::Unsupported {
                            kind,
                            symbol,
                            section: sec.name.clone(),
                            offset: r.offset,
                        })
                    }
                };
                if width == 4 && i32::try_from(v).is_err() && u32::try_from(v).is_err() {
                    return Err(fail_overflow(v, ""));
                }
                let end = r
                    .offset
                    .checked_add(width as u64)
                    .filter(|e| *e <= sec.size)
                    .ok_or_else(|| {
                        LinkError::Malformed(format!(
                            "relocation at {:#x} lies outside {}",
                            r.offset, sec.name
                        ))
                    })?;
                if sec.bytes.is_none() {
                    return Err(LinkError::Malformed(format!(
                        "relocation in bss section {}",
                        sec.name
                    )));
                }
                let o = (sec.offset + end) as usize - width;
                let le = (v as i64).to_le_bytes();
                bytes[o..o + width].copy_from_slice(&le[..width]);
            }
        }
        let mut symbols = HashMap::new();
        for (s, v) in self.symbols.iter().zip(&values) {
            if let (true, Some(Resolved::Address(a))) = (s.named, v) {
                if matches!(s.place, Place::Section(..) | Place::Common(_)) {
                    symbols.entry(s.name.clone()).or_insert(*a);
                }
            }
        }
        Ok(Image {
            bytes,
            segments: self.segments.clone(),
            symbols,
            eh_frame: self.eh_frame.map(|o| base + o),
        })
    }
}
