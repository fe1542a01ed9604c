//! The object differ, in kpatch's phases:
//!
//! 1. **correlate** the functions and data objects of an original and a patched object (built
//!    with `-ffunction-sections -fdata-sections`) by name, tolerating the numbers gcc gives
//!    clones (`.isra.N`, `.constprop.N`, `.part.N`, `.cold.N`) and static locals (`x.N`);
//! 2. **compare** each pair *modulo relocations*: two functions are the same when their bytes
//!    are equal and every relocation points at an equivalent target (the same symbol, the same
//!    string literal, the same constant), even if literal offsets moved;
//! 3. **include** what changed or is new, and decide the fate of everything an included
//!    section refers to (carried along, or bound to the running module);
//! 4. **verify** patchability: changed writable or thread-local data, or constructors, refuse.

use std::collections::{BTreeMap, HashMap};

use anyhow::{anyhow, bail, Context, Result};
use object::elf;
use object::read::elf::{ElfFile64, ElfSection64};
use object::{
    Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, SectionIndex,
    SymbolIndex, SymbolKind,
};

/// Why a fix cannot be applied live. The message tells the operator what to do instead.
#[derive(Debug, thiserror::Error)]
#[error("cannot be live-patched: {what} (a normal update and a restart are needed)")]
pub struct NotPatchable {
    pub what: String,
}

pub(crate) fn refuse(what: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(NotPatchable { what: what.into() })
}

/// An x86-64 ELF relocatable with nothing in it: the "original" of a source file the fix adds.
pub fn empty_object() -> Result<Vec<u8>> {
    object::write::Object::new(
        object::BinaryFormat::Elf,
        object::Architecture::X86_64,
        object::Endianness::Little,
    )
    .write()
    .context("writing an empty object")
}

/// Strips gcc's numeric suffixes: `foo.isra.0` → `foo.isra`, `count.3` → `count`.
pub fn normalize(name: &str) -> String {
    name.split('.')
        .filter(|part| part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()))
        .collect::<Vec<_>>()
        .join(".")
}

/// What a relocation points at, in a form that survives layout changes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// A named symbol (normalized) plus the offset into it.
    Symbol(String, i64),
    /// A string literal, by content.
    Str(Vec<u8>),
    /// Bytes of an anonymous read-only section (constants, jump tables), by content.
    Bytes(String, Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rel {
    offset: u64,
    r_type: u32,
    target: Target,
}

/// One function or data object of an object file.
#[derive(Debug, Clone)]
pub struct Entity {
    pub name: String,
    pub section: SectionIndex,
    pub kind: SymbolKind,
    pub local: bool,
    size: u64,
    data: Vec<u8>,
    rels: Vec<Rel>,
    pub writable: bool,
    pub tls: bool,
}

impl Entity {
    fn same_as(&self, other: &Entity) -> bool {
        self.size == other.size && self.data == other.data && self.rels == other.rels
    }

    /// Whether `other` is this function with only some instructions' immediate operands
    /// changed, each from `a` to `b` with `accept(a, b)`: same instructions, same lengths,
    /// same relocations.
    pub fn differs_only_in_immediates(
        &self,
        other: &Entity,
        accept: impl Fn(u64, u64) -> bool,
    ) -> bool {
        use iced_x86::{Decoder, DecoderOptions};
        if self.kind != SymbolKind::Text
            || self.size != other.size
            || self.data.len() != other.data.len()
            || self.rels != other.rels
        {
            return false;
        }
        let mut a = Decoder::new(64, &self.data, DecoderOptions::NONE);
        let mut b = Decoder::new(64, &other.data, DecoderOptions::NONE);
        let mut any = false;
        while a.can_decode() {
            let at = a.position();
            let (ia, ib) = (a.decode(), b.decode());
            if ia.is_invalid() || ib.is_invalid() || ia.len() != ib.len() {
                return false;
            }
            let (ba, bb) = (
                &self.data[at..at + ia.len()],
                &other.data[at..at + ib.len()],
            );
            if ba == bb {
                continue;
            }
            let (ca, cb) = (a.get_constant_offsets(&ia), b.get_constant_offsets(&ib));
            if !ca.has_immediate()
                || ca.has_immediate2()
                || ca.immediate_offset() != cb.immediate_offset()
            {
                return false;
            }
            let (off, size) = (ca.immediate_offset(), ca.immediate_size());
            let outside = |i: usize| i < off || i >= off + size;
            if (0..ba.len()).any(|i| outside(i) && ba[i] != bb[i]) {
                return false;
            }
            let value = |bytes: &[u8]| {
                let mut v = [0u8; 8];
                v[..size].copy_from_slice(&bytes[off..off + size]);
                u64::from_le_bytes(v)
            };
            if !accept(value(ba), value(bb)) {
                return false;
            }
            any = true;
        }
        any
    }
}

/// A parsed object file.
pub struct Obj<'d> {
    pub file: ElfFile64<'d>,
    /// Source file name as recorded in the object (`STT_FILE`).
    pub source_name: String,
    /// Functions and objects by normalized name.
    pub entities: BTreeMap<String, Entity>,
}

fn is_pc_relative(r_type: u32) -> bool {
    matches!(
        r_type,
        elf::R_X86_64_PC32
            | elf::R_X86_64_PLT32
            | elf::R_X86_64_GOTPCREL
            | elf::R_X86_64_GOTPCRELX
            | elf::R_X86_64_REX_GOTPCRELX
            | elf::R_X86_64_GOTTPOFF
            | elf::R_X86_64_TLSGD
            | elf::R_X86_64_TLSLD
    )
}

impl<'d> Obj<'d> {
    pub fn parse(data: &'d [u8]) -> Result<Obj<'d>> {
        let file = ElfFile64::parse(data).context("not an ELF object")?;
        let mut source_name = String::new();
        for s in file.symbols() {
            if s.kind() == SymbolKind::File {
                source_name = s.name().unwrap_or("").to_string();
                break;
            }
        }
        let mut obj = Obj {
            file,
            source_name,
            entities: BTreeMap::new(),
        };
        let mut entities = BTreeMap::new();
        for s in obj.file.symbols() {
            if !matches!(
                s.kind(),
                SymbolKind::Text | SymbolKind::Data | SymbolKind::Tls
            ) {
                continue;
            }
            let Some(section) = s.section_index() else {
                continue;
            };
            let Ok(name) = s.name() else { continue };
            if name.is_empty() {
                continue;
            }
            let sec = obj.file.section_by_index(section)?;
            let flags = section_flags(&sec);
            let bytes = sec
                .uncompressed_data()
                .map(|d| d.into_owned())
                .unwrap_or_default();
            let start = s.address() as usize;
            let end = (s.address() + s.size().max(1)) as usize;
            let data = bytes
                .get(start..end.min(bytes.len()))
                .unwrap_or(&[])
                .to_vec();
            let rels = obj.relocations_in(&sec, s.address(), s.address() + s.size())?;
            entities.insert(
                normalize(name),
                Entity {
                    name: name.to_string(),
                    section,
                    kind: s.kind(),
                    local: s.is_local(),
                    size: s.size(),
                    data,
                    rels,
                    writable: flags & u64::from(elf::SHF_WRITE) != 0,
                    tls: flags & u64::from(elf::SHF_TLS) != 0,
                },
            );
        }
        obj.entities = entities;
        Ok(obj)
    }

    /// The relocations inside `[lo, hi)` of a section, with layout-independent targets.
    fn relocations_in(&self, sec: &ElfSection64<'d, '_>, lo: u64, hi: u64) -> Result<Vec<Rel>> {
        let mut out = Vec::new();
        for (offset, r) in sec.relocations() {
            if offset < lo || offset >= hi.max(lo + 1) {
                continue;
            }
            let RelocationFlags::Elf { r_type } = r.flags() else {
                continue;
            };
            let RelocationTarget::Symbol(idx) = r.target() else {
                continue;
            };
            let target = self.target_of(idx, r.addend(), r_type)?;
            out.push(Rel {
                offset: offset - lo,
                r_type,
                target,
            });
        }
        Ok(out)
    }

    /// What symbol `idx` + `addend` designates, independent of layout.
    pub fn target_of(&self, idx: SymbolIndex, addend: i64, r_type: u32) -> Result<Target> {
        let sym = self.file.symbol_by_index(idx)?;
        if !is_anchor(&sym) {
            return Ok(Target::Symbol(normalize(sym.name().unwrap_or("")), addend));
        }
        let Some(section) = sym.section_index() else {
            return Ok(Target::Symbol(String::new(), addend));
        };
        // Where inside the section the reference lands (PC-relative ones carry a -4 bias).
        let at = sym.address() as i64 + addend + if is_pc_relative(r_type) { 4 } else { 0 };
        let sec = self.file.section_by_index(section)?;
        let flags = section_flags(&sec);
        let data = sec
            .uncompressed_data()
            .map(|d| d.into_owned())
            .unwrap_or_default();
        if flags & u64::from(elf::SHF_STRINGS) != 0 {
            let from = (at.max(0) as usize).min(data.len());
            let end = data[from..]
                .iter()
                .position(|&b| b == 0)
                .map(|e| from + e)
                .unwrap_or(data.len());
            return Ok(Target::Str(data[from..end].to_vec()));
        }
        // A symbol that covers the spot: refer to it by name.
        if let Some(s) = covering_symbol(&self.file, section, at) {
            return Ok(Target::Symbol(
                normalize(s.name().unwrap_or("")),
                at - s.address() as i64,
            ));
        }
        let name = sec.name().unwrap_or("").to_string();
        let from = (at.max(0) as usize).min(data.len());
        let to = (from + 16).min(data.len());
        Ok(Target::Bytes(name, data[from..to].to_vec()))
    }
}

/// A section symbol, or a local label gas keeps for references into mergeable sections
/// (`.LC0`): both only say "this place in that section".
pub fn is_anchor(sym: &object::read::elf::ElfSymbol64<'_, '_>) -> bool {
    sym.kind() == SymbolKind::Section
        || (sym.is_local()
            && !sym.is_undefined()
            && !matches!(
                sym.kind(),
                SymbolKind::Text | SymbolKind::Data | SymbolKind::Tls | SymbolKind::File
            ))
}

/// The named symbol of `section` that a reference landing at `at` means. A `rip`-relative
/// reference is biased by the bytes after the displacement: 4 normally, more when an immediate
/// follows (`movl $2, x(%rip)`), so a spot just before a symbol counts as that symbol.
pub fn covering_symbol<'d, 'f>(
    file: &'f ElfFile64<'d>,
    section: SectionIndex,
    at: i64,
) -> Option<object::read::elf::ElfSymbol64<'d, 'f>> {
    [0i64, 1, 2, 4].iter().find_map(|extra| {
        let spot = at + extra;
        file.symbols().find(|s| {
            s.section_index() == Some(section)
                && matches!(
                    s.kind(),
                    SymbolKind::Text | SymbolKind::Data | SymbolKind::Tls
                )
                && spot >= s.address() as i64
                && spot < (s.address() + s.size().max(1)) as i64
        })
    })
}

pub fn section_flags(sec: &ElfSection64<'_, '_>) -> u64 {
    match sec.flags() {
        object::SectionFlags::Elf { sh_flags } => sh_flags,
        _ => 0,
    }
}

/// The verdict on one object pair.
#[derive(Debug, Default)]
pub struct Changes {
    /// Functions present in both whose code differs (normalized names).
    pub changed: Vec<String>,
    /// Functions only in the patched object.
    pub new_functions: Vec<String>,
    /// Data objects only in the patched object.
    pub new_data: Vec<String>,
    /// Read-only data whose content changed: the patch carries the new copy.
    pub changed_rodata: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty()
            && self.new_functions.is_empty()
            && self.new_data.is_empty()
            && self.changed_rodata.is_empty()
    }
}

/// Correlate, compare and verify one object pair.
pub fn compare(orig: &Obj, patched: &Obj) -> Result<Changes> {
    let mut c = Changes::default();
    for (key, p) in &patched.entities {
        match orig.entities.get(key) {
            Some(o) if o.same_as(p) => {}
            Some(o) => match p.kind {
                SymbolKind::Text => c.changed.push(key.clone()),
                _ if p.tls || o.tls => bail!(refuse(format!(
                    "thread-local variable `{}` changed",
                    p.name
                ))),
                _ if p.writable || o.writable => {
                    let how = if o.size != p.size {
                        "size"
                    } else {
                        "initial value"
                    };
                    bail!(refuse(format!(
                        "changed {how} of existing data `{}`",
                        p.name
                    )))
                }
                _ => c.changed_rodata.push(key.clone()),
            },
            None => match p.kind {
                SymbolKind::Text => c.new_functions.push(key.clone()),
                _ if p.tls => bail!(refuse(format!("new thread-local variable `{}`", p.name))),
                _ => c.new_data.push(key.clone()),
            },
        }
    }
    // Constructors and destructors run once at start: a change to them cannot take effect.
    let ctors = |o: &Obj| -> Vec<Vec<u8>> {
        o.file
            .sections()
            .filter(|s| {
                let n = s.name().unwrap_or("");
                n.starts_with(".init_array")
                    || n.starts_with(".fini_array")
                    || n.starts_with(".ctors")
                    || n.starts_with(".dtors")
            })
            .map(|s| {
                let mut v = s.name().unwrap_or("").as_bytes().to_vec();
                for (_, r) in s.relocations() {
                    if let RelocationTarget::Symbol(i) = r.target() {
                        if let Ok(t) = o.target_of(i, r.addend(), 1) {
                            v.extend_from_slice(format!("{t:?}").as_bytes());
                        }
                    }
                }
                v
            })
            .collect()
    };
    if ctors(orig) != ctors(patched) {
        bail!(refuse("constructors or destructors changed"));
    }
    // A constructor whose body changed would never run again.
    let ctors = ctor_functions(patched);
    for key in &c.changed {
        if ctors.contains(key) {
            let name = patched
                .entities
                .get(key)
                .map(|e| e.name.as_str())
                .unwrap_or(key);
            bail!(refuse(format!(
                "constructor or destructor `{name}` changed"
            )));
        }
    }
    Ok(c)
}

/// Functions registered in `.init_array`/`.fini_array`/`.ctors`/`.dtors` (normalized names).
fn ctor_functions(o: &Obj) -> Vec<String> {
    let mut out = Vec::new();
    for s in o.file.sections() {
        let n = s.name().unwrap_or("");
        let registry = [".init_array", ".fini_array", ".ctors", ".dtors"];
        if !registry.iter().any(|r| n.starts_with(r)) {
            continue;
        }
        for (_, r) in s.relocations() {
            if let RelocationTarget::Symbol(i) = r.target() {
                if let Ok(Target::Symbol(name, _)) = o.target_of(i, r.addend(), elf::R_X86_64_64) {
                    out.push(name);
                }
            }
        }
    }
    out
}

/// Which sections of the patched object go into the patch, and what every reference from
/// them becomes.
pub struct Inclusion {
    pub sections: Vec<SectionIndex>,
}

/// Collects the sections to carry: those of changed and new entities, plus the anonymous
/// read-only sections (string literals, constants, jump tables) they refer to.
pub fn include(patched: &Obj, changes: &Changes) -> Result<Inclusion> {
    let mut sections: Vec<SectionIndex> = Vec::new();
    let names = changes
        .changed
        .iter()
        .chain(&changes.new_functions)
        .chain(&changes.new_data)
        .chain(&changes.changed_rodata);
    for key in names {
        let e = patched
            .entities
            .get(key)
            .ok_or_else(|| anyhow!("lost entity {key}"))?;
        if !sections.contains(&e.section) {
            sections.push(e.section);
        }
    }
    // Follow references to anonymous read-only sections, transitively (a jump table refers
    // back into text), and from each function to its exception table (LSDA).
    let unwind = super::eh_frame::read(&patched.file)?
        .map(|(_, records)| records)
        .unwrap_or_default();
    let mut i = 0;
    while i < sections.len() {
        let this = sections[i];
        for r in unwind.iter().filter(|r| r.code == Some(this)) {
            for &lsda in &r.refers_to {
                if !sections.contains(&lsda) {
                    sections.push(lsda);
                }
            }
        }
        let sec = patched.file.section_by_index(sections[i])?;
        for (_, r) in sec.relocations() {
            let RelocationTarget::Symbol(idx) = r.target() else {
                continue;
            };
            let sym = patched.file.symbol_by_index(idx)?;
            if !is_anchor(&sym) {
                continue;
            }
            let Some(target) = sym.section_index() else {
                continue;
            };
            if sections.contains(&target) {
                continue;
            }
            let tsec = patched.file.section_by_index(target)?;
            let flags = section_flags(&tsec);
            let named_inside = patched.file.symbols().any(|s| {
                s.section_index() == Some(target)
                    && matches!(s.kind(), SymbolKind::Text | SymbolKind::Data)
            });
            if !named_inside
                && flags & u64::from(elf::SHF_WRITE) == 0
                && flags & u64::from(elf::SHF_EXECINSTR) == 0
            {
                sections.push(target);
            }
        }
        i += 1;
    }
    Ok(Inclusion { sections })
}

/// Local symbols of a linked module by (source file, name), and globals by name: how a
/// reference from the patch finds its definition in the running module.
pub struct ModuleSymbols {
    pub locals: HashMap<(String, String), Vec<Def>>,
    pub globals: HashMap<String, Def>,
}

/// A definition in the linked module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Def {
    pub address: u64,
    pub size: u64,
    pub ifunc: bool,
    pub tls: bool,
}

impl ModuleSymbols {
    pub fn read(data: &[u8]) -> Result<ModuleSymbols> {
        let file = ElfFile64::<object::Endianness>::parse(data).context("not an ELF module")?;
        let mut locals: HashMap<(String, String), Vec<Def>> = HashMap::new();
        let mut globals = HashMap::new();
        let mut current_file = String::new();
        for s in file.symbols() {
            let Ok(name) = s.name() else { continue };
            if s.kind() == SymbolKind::File {
                current_file = name.to_string();
                continue;
            }
            if name.is_empty()
                || s.is_undefined()
                || !matches!(
                    s.kind(),
                    SymbolKind::Text | SymbolKind::Data | SymbolKind::Tls
                )
            {
                continue;
            }
            let st_type = match s.flags() {
                object::SymbolFlags::Elf { st_info, .. } => st_info & 0xf,
                _ => 0,
            };
            let def = Def {
                address: s.address(),
                size: s.size(),
                ifunc: st_type == elf::STT_GNU_IFUNC,
                tls: s.kind() == SymbolKind::Tls,
            };
            if s.is_local() {
                locals
                    .entry((current_file.clone(), normalize(name)))
                    .or_default()
                    .push(def);
            } else {
                globals.insert(normalize(name), def);
            }
        }
        Ok(ModuleSymbols { locals, globals })
    }

    /// The definition a reference from `source_file` to `name` means.
    pub fn find(&self, source_file: &str, name: &str, local: bool) -> Result<Option<Def>> {
        let key = normalize(name);
        if local {
            match self
                .locals
                .get(&(source_file.to_string(), key.clone()))
                .map(Vec::as_slice)
            {
                Some([one]) => return Ok(Some(*one)),
                Some(many) if many.len() > 1 => {
                    bail!(
                        "`{name}` of {source_file} is defined {} times in the module",
                        many.len()
                    )
                }
                _ => {}
            }
        }
        if let Some(def) = self.globals.get(&key) {
            return Ok(Some(*def));
        }
        // Hidden-visibility globals (e.g. zlib's ZLIB_INTERNAL) are locals once linked: a
        // reference from another file means the one local of that name, if there is only one.
        let mut found = self
            .locals
            .iter()
            .filter(|((_, n), _)| *n == key)
            .flat_map(|(_, defs)| defs.iter());
        match (found.next(), found.next()) {
            (Some(one), None) => Ok(Some(*one)),
            (Some(_), Some(_)) => {
                bail!("`{name}` is defined more than once in the module as a local symbol")
            }
            _ => Ok(None),
        }
    }
}
