//! Reads the ELF **modules** Suture patches: x86-64 executables and shared libraries.
//!
//! A module is identified by its GNU build-id, never by path. This crate gives what the bundler
//! and the engine need from one: the build-id, the `PT_LOAD` and `PT_TLS` segments (to turn
//! link-time addresses into runtime ones), the symbols of `.symtab` and `.dynsym`, and the file
//! bytes behind a virtual address. Input is untrusted (files read out of other processes):
//! every offset and size is checked, nothing panics.

use object::elf;
use object::elf::Sym64;
use object::read::elf::{FileHeader, ProgramHeader, SectionHeader, SectionTable, Sym};
use object::{Endianness, SectionIndex, SymbolIndex};

type Header = elf::FileHeader64<Endianness>;
type ProgramHeaderEntry = elf::ProgramHeader64<Endianness>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModuleError {
    #[error("not an ELF file")]
    NotElf,
    #[error("ELF class 32 is not supported: x86-64 only")]
    Elf32,
    #[error("unsupported machine {0}: x86-64 only")]
    Machine(u16),
    #[error("ELF type {0} is not an executable or shared library")]
    Type(u16),
    #[error("malformed ELF: {0}")]
    Malformed(String),
    /// Reading the file failed (or it is shorter than its headers say).
    #[error("cannot read the file: {0}")]
    Io(String),
}

fn malformed(e: object::Error) -> ModuleError {
    ModuleError::Malformed(e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    /// ET_EXEC: linked at a fixed address.
    Executable,
    /// ET_DYN: a position-independent executable or a shared library.
    Dynamic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
    pub align: u64,
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsSegment {
    pub vaddr: u64,
    pub memsz: u64,
    pub filesz: u64,
    pub align: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolKind {
    Function,
    /// STT_GNU_IFUNC: the address is a resolver that returns the implementation.
    Ifunc,
    Object,
    Tls,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolBinding {
    Global,
    Weak,
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolSource {
    Symtab,
    Dynsym,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    pub name: String,
    /// Link-time address; for `Tls`, the offset in the TLS template.
    pub address: u64,
    pub size: u64,
    pub kind: SymbolKind,
    pub binding: SymbolBinding,
    pub source: SymbolSource,
    /// A non-default symbol version (`foo@VER`, not `foo@@VER`).
    pub hidden_version: bool,
    /// In the dynamic symbol table (an export), whichever table the entry was read from.
    pub exported: bool,
}

/// The answer to "which definition does this name mean?".
#[derive(Debug)]
pub enum Lookup<'a> {
    Unique(&'a Symbol),
    Ambiguous(Vec<&'a Symbol>),
    NotFound,
}

/// Where `PT_GNU_EH_FRAME` (the `.eh_frame_hdr` search table) lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EhFrameHdr {
    pub vaddr: u64,
    pub offset: u64,
    pub size: u64,
}

pub struct Module<'data> {
    data: &'data [u8],
    kind: ModuleKind,
    eh_frame_hdr: Option<EhFrameHdr>,
    /// `.eh_frame` (link-time address, size) from the section headers, when present.
    eh_frame: Option<(u64, u64)>,
    build_id: Option<&'data [u8]>,
    segments: Vec<LoadSegment>,
    tls: Option<TlsSegment>,
    symbols: Vec<Symbol>,
    has_symtab: bool,
}

/// Parses just the ELF header and checks that it is ours to handle.
fn header(data: &[u8]) -> Result<(&Header, Endianness), ModuleError> {
    if data.len() < 16 || &data[..4] != b"\x7fELF" {
        return Err(ModuleError::NotElf);
    }
    if data[4] != elf::ELFCLASS64 {
        return Err(ModuleError::Elf32);
    }
    let h = Header::parse(data).map_err(malformed)?;
    let endian = h.endian().map_err(malformed)?;
    if endian != Endianness::Little {
        return Err(ModuleError::Malformed("big-endian ELF".into()));
    }
    let machine = h.e_machine(endian);
    if machine != elf::EM_X86_64 {
        return Err(ModuleError::Machine(machine));
    }
    Ok((h, endian))
}

fn build_id_of<'d>(
    h: &Header,
    endian: Endianness,
    data: &'d [u8],
) -> Result<Option<&'d [u8]>, ModuleError> {
    for ph in h.program_headers(endian, data).map_err(malformed)? {
        if ph.p_type(endian) != elf::PT_NOTE {
            continue;
        }
        let notes = ph.data(endian, data).map_err(|()| {
            ModuleError::Malformed("Invalid ELF note segment offset or size".into())
        })?;
        if let Some(id) = build_id_in_notes(ph, endian, notes)? {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// The GNU build-id, reading only the ELF header, program headers and notes.
pub fn read_build_id(data: &[u8]) -> Result<Option<Vec<u8>>, ModuleError> {
    let (h, endian) = header(data)?;
    Ok(build_id_of(h, endian, data)?.map(<[u8]>::to_vec))
}

fn kind_of(h: &Header, endian: Endianness) -> Result<ModuleKind, ModuleError> {
    match h.e_type(endian) {
        elf::ET_EXEC => Ok(ModuleKind::Executable),
        elf::ET_DYN => Ok(ModuleKind::Dynamic),
        t => Err(ModuleError::Type(t)),
    }
}

/// What the program headers say about where the module lies in memory.
struct Segments {
    load: Vec<LoadSegment>,
    tls: Option<TlsSegment>,
    eh_frame_hdr: Option<EhFrameHdr>,
}

/// One decoding of the program headers, shared by [`Module::parse`] and [`identify`] so that
/// both always agree.
fn segments_of(phdrs: &[ProgramHeaderEntry], endian: Endianness) -> Segments {
    let mut out = Segments {
        load: Vec::new(),
        tls: None,
        eh_frame_hdr: None,
    };
    for ph in phdrs {
        let flags = ph.p_flags(endian);
        match ph.p_type(endian) {
            elf::PT_LOAD => out.load.push(LoadSegment {
                vaddr: ph.p_vaddr(endian),
                memsz: ph.p_memsz(endian),
                offset: ph.p_offset(endian),
                filesz: ph.p_filesz(endian),
                align: ph.p_align(endian),
                readable: flags & elf::PF_R != 0,
                writable: flags & elf::PF_W != 0,
                executable: flags & elf::PF_X != 0,
            }),
            elf::PT_GNU_EH_FRAME => {
                out.eh_frame_hdr = Some(EhFrameHdr {
                    vaddr: ph.p_vaddr(endian),
                    offset: ph.p_offset(endian),
                    size: ph.p_filesz(endian),
                })
            }
            elf::PT_TLS => {
                out.tls = Some(TlsSegment {
                    vaddr: ph.p_vaddr(endian),
                    memsz: ph.p_memsz(endian),
                    filesz: ph.p_filesz(endian),
                    align: ph.p_align(endian),
                })
            }
            _ => {}
        }
    }
    out
}

/// The GNU build-id among the notes of one `PT_NOTE` segment (`data` is its file bytes).
fn build_id_in_notes<'d>(
    ph: &ProgramHeaderEntry,
    endian: Endianness,
    data: &'d [u8],
) -> Result<Option<&'d [u8]>, ModuleError> {
    let mut notes =
        object::read::elf::NoteIterator::<Header>::new(endian, ph.p_align(endian), data)
            .map_err(malformed)?;
    while let Some(note) = notes.next().map_err(malformed)? {
        if note.name() == elf::ELF_NOTE_GNU && note.n_type(endian) == elf::NT_GNU_BUILD_ID {
            return Ok(Some(note.desc()));
        }
    }
    Ok(None)
}

/// What identifies a module and places it in memory, without its symbols or unwind tables:
/// everything [`identify`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub build_id: Option<Vec<u8>>,
    pub kind: ModuleKind,
    pub segments: Vec<LoadSegment>,
    pub tls: Option<TlsSegment>,
}

/// At most this many program headers are read ([`identify`]); real modules have about a dozen.
pub const MAX_PROGRAM_HEADERS: usize = 128;
/// At most this many bytes of `PT_NOTE` segments are read ([`identify`]); a build-id note is
/// 36 bytes.
pub const MAX_NOTE_BYTES: u64 = 64 << 10;

/// Identifies a module from its ELF header, program headers and notes alone: a few KB read
/// through `read_at(offset, buf)` (which must fill `buf` or fail), whatever the size of the
/// file. Gives the same answer as [`Module::parse`] for every module that parser accepts and
/// whose headers stay within [`MAX_PROGRAM_HEADERS`] and [`MAX_NOTE_BYTES`].
pub fn identify(
    read_at: &dyn Fn(u64, &mut [u8]) -> std::io::Result<()>,
    file_len: u64,
) -> Result<Identity, ModuleError> {
    let read = |offset: u64, len: u64| -> Result<Vec<u8>, ModuleError> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| ModuleError::Malformed("offset overflow".into()))?;
        if end > file_len {
            return Err(ModuleError::Malformed(format!(
                "{len} bytes at {offset:#x} lie past the end of the file ({file_len} bytes)"
            )));
        }
        let len = usize::try_from(len).map_err(|_| ModuleError::Malformed("size".into()))?;
        let mut buf = vec![0u8; len];
        read_at(offset, &mut buf).map_err(|e| ModuleError::Io(e.to_string()))?;
        Ok(buf)
    };
    let head_len = file_len.min(std::mem::size_of::<Header>() as u64);
    let head = read(0, head_len)?;
    let (h, endian) = header(&head)?;
    let kind = kind_of(h, endian)?;
    let phoff = h.e_phoff(endian);
    let phnum = h.e_phnum(endian);
    if phoff == 0 || phnum == 0 {
        return Ok(Identity {
            build_id: None,
            kind,
            segments: Vec::new(),
            tls: None,
        });
    }
    if usize::from(phnum) > MAX_PROGRAM_HEADERS {
        // Also catches PN_XNUM (0xffff), the escape to a count in section 0.
        return Err(ModuleError::Malformed(format!(
            "{phnum} program headers (at most {MAX_PROGRAM_HEADERS} are read)"
        )));
    }
    let entsize = std::mem::size_of::<ProgramHeaderEntry>();
    if usize::from(h.e_phentsize(endian)) != entsize {
        return Err(ModuleError::Malformed(
            "Invalid ELF program header entry size".into(),
        ));
    }
    let table = read(phoff, (entsize * usize::from(phnum)) as u64)?;
    let (phdrs, _) = object::pod::slice_from_bytes::<ProgramHeaderEntry>(&table, phnum.into())
        .map_err(|_| ModuleError::Malformed("program header table".into()))?;
    let Segments { load, tls, .. } = segments_of(phdrs, endian);
    let mut budget = MAX_NOTE_BYTES;
    let mut build_id = None;
    for ph in phdrs.iter().filter(|ph| ph.p_type(endian) == elf::PT_NOTE) {
        let (offset, size) = ph.file_range(endian);
        if size > budget {
            return Err(ModuleError::Malformed(format!(
                "notes larger than {MAX_NOTE_BYTES} bytes"
            )));
        }
        budget -= size;
        let notes = read(offset, size)?;
        if let Some(id) = build_id_in_notes(ph, endian, &notes)? {
            build_id = Some(id.to_vec());
            break;
        }
    }
    Ok(Identity {
        build_id,
        kind,
        segments: load,
        tls,
    })
}

/// `len` zero bytes, or an error if the memory cannot be had (`vec!` would abort the process,
/// the agent included, on a huge file under strict overcommit). Freshly mapped zero pages that
/// are never written cost no memory.
fn zeroed(len: usize) -> Result<Vec<u8>, ModuleError> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u8>(len)
        .map_err(|_| ModuleError::Malformed(format!("{len} bytes")))?;
    // SAFETY: the layout's size is non-zero. A non-null result is `len` zeroed, initialized
    // bytes allocated by the global allocator with the layout of `[u8; len]`, which is what
    // `Vec::from_raw_parts(ptr, len, len)` requires for `u8`.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout);
        if ptr.is_null() {
            return Err(ModuleError::Io(format!("cannot allocate {len} bytes")));
        }
        Ok(Vec::from_raw_parts(ptr, len, len))
    }
}

/// Which of a module's tables [`read_tables`] reads; the ELF header, program and section
/// headers and notes (the build-id) are always read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tables {
    /// Symbol and version tables with their strings, and the GNU hash table.
    pub symbols: bool,
    /// `.eh_frame_hdr` and `.eh_frame`.
    pub unwind: bool,
}

impl Tables {
    pub const ALL: Tables = Tables {
        symbols: true,
        unwind: true,
    };
    pub const SYMBOLS: Tables = Tables {
        symbols: true,
        unwind: false,
    };
    pub const UNWIND: Tables = Tables {
        symbols: false,
        unwind: true,
    };
}

/// Reads the parts of a module's file that [`Module::parse`] and an unwinder look at — the ELF
/// header, program and section headers, notes, and as `which` says the symbol and version
/// tables with their strings, `.eh_frame_hdr` and `.eh_frame` — through `read_at(offset, buf)`
/// (which must fill `buf` or fail), into a buffer as long as the file whose other bytes stay
/// zero. A library costs what its tables cost, not its code (libc: ≈ 0.4 of 1.9 MB), and the
/// zero pages of a large buffer are never touched.
pub fn read_tables(
    read_at: &dyn Fn(u64, &mut [u8]) -> std::io::Result<()>,
    file_len: u64,
    which: Tables,
) -> Result<Vec<u8>, ModuleError> {
    let len = usize::try_from(file_len).map_err(|_| ModuleError::Malformed("size".into()))?;
    let mut data = zeroed(len)?;
    let fill = |data: &mut Vec<u8>, offset: u64, size: u64| -> Result<(), ModuleError> {
        let end = offset
            .checked_add(size)
            .filter(|&end| end <= file_len)
            .ok_or_else(|| {
                ModuleError::Malformed(format!(
                    "{size} bytes at {offset:#x} lie past the end of the file ({file_len} bytes)"
                ))
            })?;
        if size == 0 {
            return Ok(());
        }
        // In bounds: end <= file_len == data.len().
        read_at(offset, &mut data[offset as usize..end as usize])
            .map_err(|e| ModuleError::Io(e.to_string()))
    };
    fill(
        &mut data,
        0,
        file_len.min(std::mem::size_of::<Header>() as u64),
    )?;
    let (phoff, phnum, shoff, shentsize) = {
        let (h, endian) = header(&data)?;
        (
            h.e_phoff(endian),
            u64::from(h.e_phnum(endian)),
            h.e_shoff(endian),
            u64::from(h.e_shentsize(endian)),
        )
    };
    if usize::try_from(phnum).is_ok_and(|n| n > MAX_PROGRAM_HEADERS) {
        return Err(ModuleError::Malformed(format!(
            "{phnum} program headers (at most {MAX_PROGRAM_HEADERS} are read)"
        )));
    }
    let entsize = std::mem::size_of::<ProgramHeaderEntry>() as u64;
    fill(&mut data, phoff, phnum * entsize)?;
    // Notes (the build-id), the unwinder's search table and, for a module without section
    // headers, the rest of the segment that holds it (where `.eh_frame` lies).
    let mut wanted: Vec<(u64, u64)> = Vec::new();
    {
        let (h, endian) = header(&data)?;
        let phdrs = h.program_headers(endian, &*data).map_err(malformed)?;
        for ph in phdrs {
            let (offset, size) = ph.file_range(endian);
            match ph.p_type(endian) {
                elf::PT_NOTE => wanted.push((offset, size.min(MAX_NOTE_BYTES))),
                elf::PT_GNU_EH_FRAME if !which.unwind => {}
                elf::PT_GNU_EH_FRAME if shoff == 0 => {
                    let rest = phdrs
                        .iter()
                        .filter(|l| l.p_type(endian) == elf::PT_LOAD)
                        .map(|l| l.file_range(endian))
                        .find(|&(o, s)| offset >= o && offset < o.saturating_add(s))
                        .map(|(o, s)| o.saturating_add(s) - offset);
                    wanted.push((offset, rest.unwrap_or(size)));
                }
                elf::PT_GNU_EH_FRAME => wanted.push((offset, size)),
                _ => {}
            }
        }
    }
    // What lies outside the file is left out (the parser then says what it says of the whole
    // file: an error for notes, nothing for unwind or section tables); only a failing read is
    // an error here.
    let tolerate = |r: Result<(), ModuleError>| match r {
        Err(ModuleError::Io(e)) => Err(ModuleError::Io(e)),
        Err(_) => Ok(false),
        Ok(()) => Ok(true),
    };
    let mut read: Vec<(u64, u64)> = Vec::new();
    for (offset, size) in coalesce(std::mem::take(&mut wanted), file_len) {
        tolerate(fill(&mut data, offset, size))?;
        read.push((offset, size));
    }
    if shoff == 0 {
        return Ok(data);
    }
    // Section headers are optional at run time: a table outside the file (or malformed)
    // leaves the module without symbols, as the parser treats it.
    // Section 0 holds the real count and string-table index when they do not fit the header.
    let first = shentsize.min(file_len.saturating_sub(shoff));
    if !tolerate(fill(&mut data, shoff, first))? {
        return Ok(data);
    }
    let Ok(count) = header(&data)
        .and_then(|(h, endian)| h.shnum(endian, &*data).map(|n| n as u64).map_err(malformed))
    else {
        return Ok(data);
    };
    let rest = count.saturating_mul(shentsize).saturating_sub(first);
    if !tolerate(fill(&mut data, shoff + first, rest))? {
        return Ok(data);
    }
    let strings = {
        let (h, endian) = header(&data)?;
        let index = h.shstrndx(endian, &*data).ok().map(|i| i as usize);
        h.section_headers(endian, &*data)
            .ok()
            .zip(index)
            .and_then(|(shdrs, i)| shdrs.get(i))
            .and_then(|sh| sh.file_range(endian))
            .unwrap_or((0, 0))
    };
    if !tolerate(fill(&mut data, strings.0, strings.1))? {
        return Ok(data);
    }
    {
        let (h, endian) = header(&data)?;
        let Ok(sections) = h.sections(endian, &*data) else {
            return Ok(data);
        };
        let range = |i: usize| {
            sections
                .section(SectionIndex(i))
                .ok()
                .and_then(|sh| sh.file_range(endian))
        };
        for (i, sh) in sections.iter().enumerate() {
            let name = sections.section_name(endian, sh).unwrap_or_default();
            let with_link = match sh.sh_type(endian) {
                elf::SHT_SYMTAB
                | elf::SHT_DYNSYM
                | elf::SHT_GNU_HASH
                | elf::SHT_GNU_VERSYM
                | elf::SHT_GNU_VERDEF
                | elf::SHT_GNU_VERNEED
                    if which.symbols =>
                {
                    true
                }
                elf::SHT_NOTE => false,
                _ if which.unwind && (name == b".eh_frame" || name == b".eh_frame_hdr") => false,
                _ => continue,
            };
            wanted.extend(range(i));
            if with_link {
                wanted.extend(range(sh.sh_link(endian) as usize));
            }
        }
    }
    // Tables share bytes (a symbol table's strings are a version table's too) and lie side by
    // side (libc's dynamic symbols, strings and versions): each byte is read once, in as few
    // reads as there are runs of tables.
    let within = |&(o, s): &(u64, u64)| read.iter().any(|&(ro, rs)| o >= ro && o + s <= ro + rs);
    wanted.retain(|r| !within(r));
    for (offset, size) in coalesce(wanted, file_len) {
        tolerate(fill(&mut data, offset, size))?;
    }
    Ok(data)
}

/// Gaps this small between two tables are read rather than paid for with another system call.
const READ_GAP: u64 = 4096;

/// The ranges in the file, merged where they overlap or lie within [`READ_GAP`] of each other.
/// Ranges reaching past the end are kept as they are, alone: their read fails (and is
/// tolerated) without keeping a neighbour out.
fn coalesce(mut ranges: Vec<(u64, u64)>, file_len: u64) -> Vec<(u64, u64)> {
    let inside = |&(o, s): &(u64, u64)| o.checked_add(s).is_some_and(|end| end <= file_len);
    let (mut merged, outside): (Vec<_>, Vec<_>) = ranges.drain(..).partition(inside);
    merged.retain(|&(_, s)| s > 0);
    merged.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(merged.len() + outside.len());
    for (o, s) in merged {
        match out.last_mut() {
            Some((lo, ls)) if o <= *lo + *ls + READ_GAP => *ls = (*ls).max(o + s - *lo),
            _ => out.push((o, s)),
        }
    }
    out.extend(outside);
    out
}

/// The defined symbols of a module's `.symtab` and `.dynsym` (see [`Module::symbols`]), and
/// whether it has a `.symtab`; none for a module without section headers.
pub fn read_symbols(data: &[u8]) -> Result<(Vec<Symbol>, bool), ModuleError> {
    let (h, endian) = header(data)?;
    match h.sections(endian, data) {
        Ok(sections) => symbols_of(&sections, endian, data),
        Err(_) => Ok((Vec::new(), false)),
    }
}

/// The kind and binding of a defined symbol; `None` for what is not one (undefined, section
/// and file symbols, reserved section indexes, unknown bindings).
fn classify(sym: &Sym64<Endianness>, endian: Endianness) -> Option<(SymbolKind, SymbolBinding)> {
    let shndx = sym.st_shndx(endian);
    if shndx == elf::SHN_UNDEF
        || (shndx >= elf::SHN_LORESERVE && shndx != elf::SHN_ABS && shndx != elf::SHN_XINDEX)
    {
        return None;
    }
    let kind = match sym.st_type() {
        elf::STT_FUNC => SymbolKind::Function,
        elf::STT_GNU_IFUNC => SymbolKind::Ifunc,
        elf::STT_OBJECT | elf::STT_COMMON => SymbolKind::Object,
        elf::STT_TLS => SymbolKind::Tls,
        elf::STT_SECTION | elf::STT_FILE => return None,
        _ => SymbolKind::Other,
    };
    let binding = match sym.st_bind() {
        elf::STB_GLOBAL | elf::STB_GNU_UNIQUE => SymbolBinding::Global,
        elf::STB_WEAK => SymbolBinding::Weak,
        elf::STB_LOCAL => SymbolBinding::Local,
        _ => return None,
    };
    Some((kind, binding))
}

/// The exported definition of `name` that [`lookup_dynamic_in`] finds among all the module's
/// symbols, found through its GNU hash table instead (what the dynamic loader does): a
/// one-off lookup in libc costs a few chain entries, not a read of its 3,000 symbols.
/// `None` when the module has no usable GNU hash table (read the symbols then).
pub fn lookup_dynamic_hashed(data: &[u8], name: &str) -> Option<Option<Symbol>> {
    let (h, endian) = header(data).ok()?;
    let sections = h.sections(endian, data).ok()?;
    let (table, link) = sections.gnu_hash(endian, data).ok()??;
    if sections.section(link).ok()?.sh_type(endian) != elf::SHT_DYNSYM {
        return None;
    }
    let symbols = sections.symbol_table_by_index(endian, data, link).ok()?;
    let versions = sections.versions(endian, data).ok()?.unwrap_or_default();
    let raw = name.as_bytes();
    let hash = elf::gnu_hash(raw);
    // The default version first (`versions` skips hidden ones), else any (an empty table
    // hides nothing): the order `lookup_dynamic_in` prefers.
    let Some((index, sym)) = table
        .find(endian, raw, hash, None, &symbols, &versions)
        .or_else(|| table.find(endian, raw, hash, None, &symbols, &Default::default()))
    else {
        return Some(None);
    };
    let found = classify(sym, endian)
        .filter(|&(_, binding)| binding != SymbolBinding::Local)
        .map(|(kind, binding)| Symbol {
            name: name.to_string(),
            address: sym.st_value(endian),
            size: sym.st_size(endian),
            kind,
            binding,
            source: SymbolSource::Dynsym,
            hidden_version: versions.version_index(endian, index).is_hidden(),
            exported: true,
        });
    Some(found)
}

fn symbols_of<'data>(
    sections: &SectionTable<'data, Header>,
    endian: Endianness,
    data: &'data [u8],
) -> Result<(Vec<Symbol>, bool), ModuleError> {
    let mut symbols = Vec::new();
    // Keyed by the name's bytes in the string table: no allocation per symbol.
    let mut in_symtab: std::collections::HashMap<(&[u8], u64), usize> =
        std::collections::HashMap::new();
    let mut has_symtab = false;
    for (sh_type, source) in [
        (elf::SHT_SYMTAB, SymbolSource::Symtab),
        (elf::SHT_DYNSYM, SymbolSource::Dynsym),
    ] {
        let table = sections.symbols(endian, data, sh_type).map_err(malformed)?;
        if table.is_empty() {
            continue;
        }
        if source == SymbolSource::Symtab {
            has_symtab = true;
        }
        let versions = if source == SymbolSource::Dynsym {
            sections.versions(endian, data).ok().flatten()
        } else {
            None
        };
        for (index, sym) in table.iter().enumerate() {
            let Some((kind, binding)) = classify(sym, endian) else {
                continue;
            };
            let Ok(raw) = table.symbol_name(endian, sym) else {
                continue;
            };
            if raw.is_empty() {
                continue;
            }
            let Ok(name) = std::str::from_utf8(raw) else {
                continue;
            };
            let hidden_version = versions
                .as_ref()
                .map(|v| v.version_index(endian, SymbolIndex(index)).is_hidden())
                .unwrap_or(false);
            let s = Symbol {
                name: name.to_string(),
                address: sym.st_value(endian),
                size: sym.st_size(endian),
                kind,
                binding,
                source,
                hidden_version,
                exported: source == SymbolSource::Dynsym,
            };
            // .dynsym mostly repeats .symtab: one entry (the symtab one, which has the
            // sizes of locals) that says it is exported too.
            if source == SymbolSource::Symtab {
                in_symtab.insert((raw, s.address), symbols.len());
            } else if let Some(&i) = in_symtab.get(&(raw, s.address)) {
                let o: &mut Symbol = &mut symbols[i];
                if o.kind == s.kind {
                    o.exported = true;
                    o.hidden_version = s.hidden_version;
                    continue;
                }
            }
            symbols.push(s);
        }
    }
    Ok((symbols, has_symtab))
}

impl<'data> Module<'data> {
    pub fn parse(data: &'data [u8]) -> Result<Self, ModuleError> {
        let mut module = Self::parse_layout(data)?;
        (module.symbols, module.has_symtab) = read_symbols(data)?;
        Ok(module)
    }

    /// Everything but the symbols, which cost most of a parse (a `String` each: libc has
    /// 3,000): [`Module::symbols`] is empty; [`read_symbols`] reads them when they are needed.
    pub fn parse_layout(data: &'data [u8]) -> Result<Self, ModuleError> {
        let (h, endian) = header(data)?;
        let kind = kind_of(h, endian)?;
        let phdrs = h.program_headers(endian, data).map_err(malformed)?;
        let Segments {
            load: segments,
            tls,
            eh_frame_hdr,
        } = segments_of(phdrs, endian);
        let build_id = build_id_of(h, endian, data)?;
        let mut eh_frame = None;
        // Section headers are optional at run time; a module without them has no symbols.
        if let Ok(sections) = h.sections(endian, data) {
            for sh in sections.iter() {
                if sections.section_name(endian, sh).ok() == Some(b".eh_frame".as_slice()) {
                    eh_frame = Some((sh.sh_addr(endian), sh.sh_size(endian)));
                }
            }
        }
        Ok(Module {
            data,
            kind,
            eh_frame_hdr,
            eh_frame,
            build_id,
            segments,
            tls,
            symbols: Vec::new(),
            has_symtab: false,
        })
    }

    pub fn build_id(&self) -> Option<&'data [u8]> {
        self.build_id
    }

    pub fn build_id_hex(&self) -> Option<String> {
        self.build_id.map(hex::encode)
    }

    pub fn kind(&self) -> ModuleKind {
        self.kind
    }

    pub fn load_segments(&self) -> &[LoadSegment] {
        &self.segments
    }

    /// The unwind search table, if the module has one (every normally linked module does).
    pub fn eh_frame_hdr(&self) -> Option<EhFrameHdr> {
        self.eh_frame_hdr
    }

    /// The `.eh_frame` section's link-time address and size (modules linked without an
    /// `.eh_frame_hdr`, such as static executables, still have it).
    pub fn eh_frame(&self) -> Option<(u64, u64)> {
        self.eh_frame
    }

    /// The file bytes from `vaddr` to the end of the file-backed part of its `PT_LOAD`.
    pub fn bytes_from(&self, vaddr: u64) -> Option<&'data [u8]> {
        // checked_add: a malformed segment can claim to run past the end of the address space.
        let (_, end) = self
            .segments
            .iter()
            .filter_map(|s| Some((s.vaddr, s.vaddr.checked_add(s.filesz)?)))
            .find(|&(start, end)| vaddr >= start && vaddr < end)?;
        self.bytes_at(vaddr, end - vaddr)
    }

    pub fn tls_segment(&self) -> Option<TlsSegment> {
        self.tls
    }

    pub fn has_symtab(&self) -> bool {
        self.has_symtab
    }

    pub fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    /// Which definition a reference to `name` means (see [`lookup_in`]).
    pub fn lookup(&self, name: &str) -> Lookup<'_> {
        lookup_in(&self.symbols, name)
    }

    /// Every name the module exports (see [`dynamic_exports_in`]).
    pub fn dynamic_exports(&self) -> std::collections::HashMap<&str, &Symbol> {
        dynamic_exports_in(&self.symbols)
    }

    /// The exported definition of `name` (from `.dynsym`, preferring the default version).
    pub fn lookup_dynamic(&self, name: &str) -> Option<&Symbol> {
        lookup_dynamic_in(&self.symbols, name)
    }

    /// The file bytes behind `[vaddr, vaddr + len)`, if one `PT_LOAD` backs them entirely.
    pub fn bytes_at(&self, vaddr: u64, len: u64) -> Option<&'data [u8]> {
        let seg = self.segments.iter().find(|s| {
            vaddr >= s.vaddr
                && vaddr
                    .checked_add(len)
                    .is_some_and(|end| end <= s.vaddr.saturating_add(s.filesz))
        })?;
        let start = usize::try_from(seg.offset.checked_add(vaddr - seg.vaddr)?).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.data.get(start..end)
    }

    /// Lowest `PT_LOAD` address (page-aligned down) to the highest end.
    pub fn vaddr_range(&self) -> (u64, u64) {
        let lo = self
            .segments
            .iter()
            .map(|s| s.vaddr & !0xfff)
            .min()
            .unwrap_or(0);
        let hi = self
            .segments
            .iter()
            .map(|s| s.vaddr.saturating_add(s.memsz))
            .max()
            .unwrap_or(0);
        (lo, hi)
    }
}

/// The load bias of a module from one of its runtime mappings (start address and file offset,
/// as `/proc/PID/maps` shows them): runtime address = bias + link-time address.
pub fn load_bias(module: &Module, mapping_start: u64, mapping_file_offset: u64) -> Option<u64> {
    let seg = module
        .segments
        .iter()
        .find(|s| s.offset & !0xfff == mapping_file_offset)?;
    Some(mapping_start.wrapping_sub(seg.vaddr & !0xfff))
}

/// Which definition a reference to `name` means: global/weak definitions first (all at one
/// address, or ambiguous), then locals (static functions and variables).
pub fn lookup_in<'a>(symbols: &'a [Symbol], name: &str) -> Lookup<'a> {
    let named = || symbols.iter().filter(move |s| s.name == name);
    let global: Vec<&Symbol> = named()
        .filter(|s| s.binding != SymbolBinding::Local)
        .collect();
    if let Some(first) = global.first() {
        if global.iter().all(|s| s.address == first.address) {
            let best = global
                .iter()
                .find(|s| s.source == SymbolSource::Symtab)
                .or_else(|| global.iter().find(|s| !s.hidden_version))
                .unwrap_or(first);
            return Lookup::Unique(best);
        }
        let defaults: Vec<&Symbol> = global
            .iter()
            .copied()
            .filter(|s| !s.hidden_version)
            .collect();
        if defaults.len() == 1 {
            return Lookup::Unique(defaults[0]);
        }
        return Lookup::Ambiguous(global);
    }
    let mut local: Vec<&Symbol> = named().collect();
    local.dedup_by_key(|s| s.address);
    match local.len() {
        0 => Lookup::NotFound,
        1 => Lookup::Unique(local[0]),
        _ => {
            let first = local[0].address;
            if local.iter().all(|s| s.address == first) {
                Lookup::Unique(local[0])
            } else {
                Lookup::Ambiguous(local)
            }
        }
    }
}

/// The exported definition of `name` among `symbols` (the one [`dynamic_exports_in`] keeps for
/// it), by a scan: cheaper than building the map for a few names.
pub fn lookup_dynamic_in<'a>(symbols: &'a [Symbol], name: &str) -> Option<&'a Symbol> {
    let exported = || {
        symbols
            .iter()
            .filter(move |s| s.exported && s.name == name && s.binding != SymbolBinding::Local)
    };
    exported()
        .find(|s| !s.hidden_version)
        .or_else(|| exported().next())
}

/// Every name the module exports (its dynamic symbol table), each with the definition
/// [`Module::lookup_dynamic`] would give: the default version where there are several.
/// One pass, for modules with tens of thousands of symbols.
pub fn dynamic_exports_in(symbols: &[Symbol]) -> std::collections::HashMap<&str, &Symbol> {
    let mut map: std::collections::HashMap<&str, &Symbol> =
        std::collections::HashMap::with_capacity(symbols.len());
    for s in symbols {
        if !s.exported || s.binding == SymbolBinding::Local {
            continue;
        }
        map.entry(s.name.as_str())
            .and_modify(|old| {
                if old.hidden_version && !s.hidden_version {
                    *old = s;
                }
            })
            .or_insert(s);
    }
    map
}
