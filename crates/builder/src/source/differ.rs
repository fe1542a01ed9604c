//! The object differ, in kpatch's phases:
//!
//! 1. **correlate** the functions and data objects of an original and a patched object (built
//!    with `-ffunction-sections -fdata-sections`) by what they are, never by the numbers gcc
//!    gives clones (`.isra.N`, `.constprop.N`, `.part.N`) and function-local statics
//!    (`__PRETTY_FUNCTION__.N`, `module.N`: by name and owning function); aliases (several
//!    symbols at one place) are one entity (see [`Obj::parse`]);
//! 2. **compare** each pair *modulo relocations*: two functions are the same when their bytes
//!    are equal and every relocation points at an equivalent target (the same symbol, the same
//!    string literal, the same constant), even if literal offsets moved;
//! 3. **include** what changed or is new, and decide the fate of everything an included
//!    section refers to (carried along, or bound to the running module);
//! 4. **verify** patchability: changed writable or thread-local data, or constructors, refuse.
//!
//! [`ModuleSymbols`] and [`UnitBinding`] then bind what the patch does not carry to the
//! deployed module: through the original object's exact names, in the part of the module's
//! symbol table that object contributed (its `STT_FILE` group), found by name, then by the
//! contents of its locals and by which of them its global functions reference.

use std::collections::{BTreeMap, HashMap};

use anyhow::{anyhow, Context, Result};
use object::elf;
use object::read::elf::{ElfFile64, ElfSection64};
use object::{
    Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, SectionIndex,
    SymbolIndex, SymbolKind,
};
use sha2::{Digest, Sha256};

pub(crate) use super::refusal::refuse;
use super::refusal::RefusalKind;

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
    /// Other symbols at the same place (`__attribute__((alias))`, libxml2's
    /// `…__internal_alias`): one function under several names.
    pub aliases: Vec<String>,
    pub section: SectionIndex,
    pub kind: SymbolKind,
    pub local: bool,
    size: u64,
    data: Vec<u8>,
    rels: Vec<Rel>,
    pub writable: bool,
    pub tls: bool,
    /// In a section without file contents (`.bss`).
    pub nobits: bool,
    /// Writable only to be relocated (`.data.rel.ro`: vtables, typeinfo), or a `DW.ref`
    /// pointer the unwinder reads: data, but never state.
    pub relro: bool,
}

impl Entity {
    /// Whether `linked` (this entity's bytes in a linked module) is this entity with its
    /// relocations applied: equal everywhere but at relocated spots (and the opcode bytes the
    /// linker may relax before a GOT reference).
    pub fn same_bytes_as_linked(&self, linked: &[u8]) -> bool {
        if linked.len() != self.data.len() {
            return false;
        }
        let mut masked = vec![false; linked.len()];
        for r in &self.rels {
            let width = if matches!(r.r_type, elf::R_X86_64_64 | elf::R_X86_64_DTPOFF64) {
                8
            } else {
                4
            };
            let relaxed = matches!(
                r.r_type,
                elf::R_X86_64_GOTPCRELX | elf::R_X86_64_REX_GOTPCRELX | elf::R_X86_64_GOTPCREL
            );
            let from = (r.offset as usize).saturating_sub(if relaxed { 3 } else { 0 });
            for m in masked.iter_mut().take(r.offset as usize + width).skip(from) {
                *m = true;
            }
        }
        self.data
            .iter()
            .zip(linked)
            .zip(&masked)
            .all(|((a, b), m)| *m || a == b)
    }

    fn same_as(&self, other: &Entity) -> bool {
        self.size == other.size && self.data == other.data && self.rels == other.rels
    }

    /// The names (entity keys, or symbol names) this entity refers to.
    pub fn symbol_targets(&self) -> impl Iterator<Item = &str> {
        self.rels.iter().filter_map(|r| match &r.target {
            Target::Symbol(n, _) => Some(n.as_str()),
            _ => None,
        })
    }

    /// How many references to `name` this entity makes (calls to `free`, …).
    pub fn references_to(&self, name: &str) -> usize {
        self.symbol_targets().filter(|n| *n == name).count()
    }

    /// The same code and data as `other`, except that anonymous constants count by content only:
    /// a build with `-ffunction-sections` puts a function's jump table in a section of its
    /// own name, one without in `.rodata`.
    pub fn same_code_as(&self, other: &Entity) -> bool {
        let unnamed = |t: &Target| match t {
            Target::Bytes(_, b) => Target::Bytes(String::new(), b.clone()),
            t => t.clone(),
        };
        self.size == other.size
            && self.data == other.data
            && self.rels.len() == other.rels.len()
            && self.rels.iter().zip(&other.rels).all(|(a, b)| {
                a.offset == b.offset
                    && a.r_type == b.r_type
                    && unnamed(&a.target) == unnamed(&b.target)
            })
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
    /// Functions and objects by correlation key (see [`Obj::parse`]).
    pub entities: BTreeMap<String, Entity>,
    /// The key of every symbol that is an entity or one of its aliases.
    pub keys: HashMap<SymbolIndex, String>,
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

/// Whether gcc numbered this name (`count.3`, `__PRETTY_FUNCTION__.24`, `f.constprop.0`):
/// the numbers depend on what else the file holds, so they never identify anything.
pub fn is_numbered(name: &str) -> bool {
    name.split('.')
        .skip(1)
        .any(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
}

/// A symbol that may become an entity.
struct Candidate {
    index: SymbolIndex,
    name: String,
    section: SectionIndex,
    address: u64,
    size: u64,
    kind: SymbolKind,
    local: bool,
    /// Default visibility (exported), for choosing the main name among aliases.
    exported: bool,
}

impl<'d> Obj<'d> {
    /// Reads the functions and data objects of an object file and gives each a key that
    /// correlates it with its counterpart in another build of the same source:
    ///
    /// - named symbols by name (gcc's clone numbers stripped: `f.isra.0` → `f.isra`);
    /// - several symbols at one place are one entity, under the exported name;
    /// - numbered function-local statics (`__PRETTY_FUNCTION__.24`, `module.5`, `count.3`) by
    ///   what they are: their name and the function that references them
    ///   (`__PRETTY_FUNCTION__@jv_free`), never by gcc's number, which shifts as soon as the
    ///   fix adds a static above them;
    /// - what is still the same (two blocks of one function each with a `static` of one
    ///   name, two clones of one kind) is told apart by order: `#2`, `#3`.
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
            keys: HashMap::new(),
        };
        let mut cands = Vec::new();
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
            let st_other = match s.flags() {
                object::SymbolFlags::Elf { st_other, .. } => st_other,
                _ => 0,
            };
            cands.push(Candidate {
                index: s.index(),
                name: name.to_string(),
                section,
                address: s.address(),
                size: s.size(),
                kind: s.kind(),
                local: s.is_local(),
                exported: !s.is_local() && st_other & 3 == elf::STV_DEFAULT,
            });
        }
        // Aliases: one entity per place, named by its exported (else global, else shortest)
        // name, the same choice in every build.
        let mut places: BTreeMap<(usize, u64, u64), Vec<usize>> = BTreeMap::new();
        for (i, c) in cands.iter().enumerate() {
            places
                .entry((c.section.0, c.address, c.size))
                .or_default()
                .push(i);
        }
        let mut primary_of: Vec<usize> = (0..cands.len()).collect();
        for group in places.values() {
            let best = *group
                .iter()
                .min_by_key(|&&i| {
                    let c = &cands[i];
                    (!c.exported, c.local, c.name.len(), c.name.clone())
                })
                .unwrap_or(&group[0]);
            for &i in group {
                primary_of[i] = best;
            }
        }
        // Which functions reference each numbered local data object.
        let by_index: HashMap<SymbolIndex, usize> = cands
            .iter()
            .enumerate()
            .map(|(i, c)| (c.index, i))
            .collect();
        let numbered_data =
            |c: &Candidate| c.local && c.kind != SymbolKind::Text && is_numbered(&c.name);
        let mut owners: HashMap<usize, Vec<String>> = HashMap::new();
        if cands.iter().any(numbered_data) {
            for (i, f) in cands.iter().enumerate() {
                if f.kind != SymbolKind::Text || primary_of[i] != i {
                    continue;
                }
                let owner = f.name.split('.').next().unwrap_or(&f.name).to_string();
                let sec = obj.file.section_by_index(f.section)?;
                for (offset, r) in sec.relocations() {
                    if offset < f.address || offset >= f.address + f.size.max(1) {
                        continue;
                    }
                    let (RelocationTarget::Symbol(ti), RelocationFlags::Elf { r_type }) =
                        (r.target(), r.flags())
                    else {
                        continue;
                    };
                    let Some(t) = obj.referenced_symbol(ti, r.addend(), r_type)? else {
                        continue;
                    };
                    let Some(&ci) = by_index.get(&t) else {
                        continue;
                    };
                    let ci = primary_of[ci];
                    if numbered_data(&cands[ci]) {
                        let list = owners.entry(ci).or_default();
                        if !list.contains(&owner) {
                            list.push(owner.clone());
                        }
                    }
                }
            }
        }
        // Keys, in symbol order; repeats get `#n`.
        let mut used: HashMap<String, usize> = HashMap::new();
        let mut key_of: HashMap<usize, String> = HashMap::new();
        for (i, c) in cands.iter().enumerate() {
            if primary_of[i] != i {
                continue;
            }
            let mut key = normalize(&c.name);
            if numbered_data(c) {
                key = match obj.read_only_identity(c)? {
                    // Read-only: what it holds is what it is (`__PRETTY_FUNCTION__=jv_free`);
                    // equal copies are interchangeable, a changed one is new data.
                    Some(identity) => format!("{key}={identity}"),
                    // State: its owning function says which one it is.
                    None => {
                        let owner = owners
                            .get(&i)
                            .and_then(|o| o.iter().min())
                            .cloned()
                            .unwrap_or_default();
                        format!("{key}@{owner}")
                    }
                };
            }
            let n = used.entry(key.clone()).or_insert(0);
            *n += 1;
            if *n > 1 {
                key = format!("{key}#{n}");
            }
            key_of.insert(i, key);
        }
        for (i, c) in cands.iter().enumerate() {
            if let Some(k) = key_of.get(&primary_of[i]) {
                obj.keys.insert(c.index, k.clone());
            }
        }
        let mut entities = BTreeMap::new();
        for (i, c) in cands.iter().enumerate() {
            let Some(key) = key_of.get(&i) else { continue };
            let sec = obj.file.section_by_index(c.section)?;
            let flags = section_flags(&sec);
            let nobits = matches!(
                sec.kind(),
                object::SectionKind::UninitializedData | object::SectionKind::UninitializedTls
            );
            let bytes = sec
                .uncompressed_data()
                .map(|d| d.into_owned())
                .unwrap_or_default();
            let start = c.address as usize;
            let end = (c.address + c.size.max(1)) as usize;
            let data = bytes
                .get(start..end.min(bytes.len()))
                .unwrap_or(&[])
                .to_vec();
            let rels = obj.relocations_in(&sec, c.address, c.address + c.size)?;
            let aliases = cands
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i && primary_of[j] == i)
                .map(|(_, a)| a.name.clone())
                .collect();
            entities.insert(
                key.clone(),
                Entity {
                    name: c.name.clone(),
                    aliases,
                    section: c.section,
                    kind: c.kind,
                    local: c.local,
                    size: c.size,
                    data,
                    rels,
                    writable: flags & u64::from(elf::SHF_WRITE) != 0,
                    tls: flags & u64::from(elf::SHF_TLS) != 0,
                    nobits,
                    relro: sec.name().unwrap_or("").starts_with(".data.rel.ro")
                        || c.name.starts_with("DW.ref."),
                },
            );
        }
        obj.entities = entities;
        Ok(obj)
    }

    /// Gives a numbered static whose key has no counterpart in `orig` the key of the one
    /// static in `orig` that has no counterpart here, has the same name and kind and size
    /// (and contents, if read-only): the same static, whose owning function gcc saw
    /// differently (a `static` in an inline helper whose callers changed). Without this it
    /// would be new data, a second copy of live state.
    pub fn adopt_keys_from(&mut self, orig: &Obj) {
        let base = |k: &str| k.split('@').next().unwrap_or(k).to_string();
        let numbered = |e: &Entity| e.local && e.kind != SymbolKind::Text && is_numbered(&e.name);
        let mut renames: HashMap<String, String> = HashMap::new();
        for (key, e) in &self.entities {
            if orig.entities.contains_key(key) || !numbered(e) {
                continue;
            }
            let candidates: Vec<&String> = orig
                .entities
                .iter()
                .filter(|(k, o)| {
                    !self.entities.contains_key(*k)
                        && numbered(o)
                        && base(k) == base(key)
                        && o.kind == e.kind
                        && o.size == e.size
                        && o.writable == e.writable
                        && (o.writable || o.data == e.data)
                })
                .map(|(k, _)| k)
                .collect();
            if let [one] = candidates.as_slice() {
                renames.insert(key.clone(), (*one).clone());
            }
        }
        // Two of ours may have picked the same one: then neither is sure.
        let mut counts: HashMap<&String, usize> = HashMap::new();
        for v in renames.values() {
            *counts.entry(v).or_default() += 1;
        }
        let renames: HashMap<String, String> = renames
            .iter()
            .filter(|(_, v)| counts.get(v) == Some(&1))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if renames.is_empty() {
            return;
        }
        for (from, to) in &renames {
            if let Some(e) = self.entities.remove(from) {
                self.entities.insert(to.clone(), e);
            }
        }
        for k in self.keys.values_mut() {
            if let Some(to) = renames.get(k) {
                *k = to.clone();
            }
        }
        for e in self.entities.values_mut() {
            for r in &mut e.rels {
                if let Target::Symbol(n, _) = &mut r.target {
                    if let Some(to) = renames.get(n) {
                        *n = to.clone();
                    }
                }
            }
        }
    }

    /// What a read-only data object holds, as a key: the string itself when it is a short
    /// printable string without relocations, else a hash of its bytes and relocations.
    /// `None` for writable or thread-local data.
    fn read_only_identity(&self, c: &Candidate) -> Result<Option<String>> {
        let sec = self.file.section_by_index(c.section)?;
        if section_flags(&sec) & u64::from(elf::SHF_WRITE | elf::SHF_TLS) != 0 {
            return Ok(None);
        }
        let bytes = sec.uncompressed_data().unwrap_or_default();
        let (start, end) = (c.address as usize, (c.address + c.size) as usize);
        let data = bytes.get(start..end.min(bytes.len())).unwrap_or(&[]);
        let mut rels = String::new();
        for (off, r) in sec.relocations() {
            if off < c.address || off >= c.address + c.size {
                continue;
            }
            let target = match r.target() {
                RelocationTarget::Symbol(i) => self
                    .file
                    .symbol_by_index(i)
                    .ok()
                    .and_then(|s| s.name().ok().map(normalize))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            rels += &format!("{}:{target}{:+};", off - c.address, r.addend());
        }
        let text = data.strip_suffix(&[0]).unwrap_or(data);
        let printable = !text.is_empty()
            && text.len() <= 64
            && text.iter().all(|b| (0x20..0x7f).contains(b))
            && !text.contains(&0);
        if printable && rels.is_empty() {
            return Ok(Some(String::from_utf8_lossy(text).into_owned()));
        }
        let mut h = Sha256::new();
        h.update(data);
        h.update(rels.as_bytes());
        Ok(Some(hex::encode(&h.finalize()[..8])))
    }

    /// The named symbol a relocation against `idx` + `addend` reaches: `idx` itself, or for
    /// a section symbol or label, the symbol covering the spot.
    fn referenced_symbol(
        &self,
        idx: SymbolIndex,
        addend: i64,
        r_type: u32,
    ) -> Result<Option<SymbolIndex>> {
        let sym = self.file.symbol_by_index(idx)?;
        if !is_anchor(&sym) {
            return Ok(Some(idx));
        }
        let Some(section) = sym.section_index() else {
            return Ok(None);
        };
        let at = sym.address() as i64 + addend + if is_pc_relative(r_type) { 4 } else { 0 };
        Ok(covering_symbol(&self.file, section, at).map(|s| s.index()))
    }

    /// The name a reference to symbol `idx` compares by: its entity's key, else its name
    /// without gcc's numbers.
    fn key_or_name(&self, idx: SymbolIndex, name: &str) -> String {
        self.keys
            .get(&idx)
            .cloned()
            .unwrap_or_else(|| normalize(name))
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
            return Ok(Target::Symbol(
                self.key_or_name(idx, sym.name().unwrap_or("")),
                addend,
            ));
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
                self.key_or_name(s.index(), s.name().unwrap_or("")),
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
pub fn compare(
    orig: &Obj,
    patched: &Obj,
    noise: &std::collections::BTreeSet<String>,
) -> Result<Changes> {
    let mut c = Changes::default();
    for (key, p) in &patched.entities {
        if noise.contains(key) {
            continue;
        }
        match orig.entities.get(key) {
            Some(o) if o.same_as(p) => {}
            Some(o) => match p.kind {
                SymbolKind::Text => c.changed.push(key.clone()),
                _ if p.tls || o.tls => {
                    return Err(refuse(
                        RefusalKind::Tls,
                        format!("thread-local variable `{}` changed", p.name),
                    ))
                }
                _ if p.writable || o.writable => {
                    let how = if o.size != p.size {
                        "size"
                    } else {
                        "initial value"
                    };
                    return Err(refuse(
                        RefusalKind::DataInit,
                        format!("changed {how} of existing data `{}`", p.name),
                    ));
                }
                _ => c.changed_rodata.push(key.clone()),
            },
            None => match p.kind {
                SymbolKind::Text => c.new_functions.push(key.clone()),
                _ if p.tls => {
                    return Err(refuse(
                        RefusalKind::Tls,
                        format!("new thread-local variable `{}`", p.name),
                    ))
                }
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
        return Err(refuse(
            RefusalKind::Constructor,
            "constructors or destructors changed",
        ));
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
            return Err(refuse(
                RefusalKind::Constructor,
                format!("constructor or destructor `{name}` changed"),
            ));
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

/// The symbols of the linked module (the rebuilt original as deployed): globals by name, and
/// the local symbols of each input file (the symbols after each `STT_FILE`, in link order):
/// how a reference from the patch finds its definition in the running module.
pub struct ModuleSymbols {
    groups: Vec<Group>,
    globals: HashMap<String, Def>,
}

/// The local symbols one input file brought into the link, by exact name.
struct Group {
    file: String,
    locals: HashMap<String, Vec<Def>>,
}

/// A definition in the linked module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Def {
    pub address: u64,
    pub size: u64,
    pub ifunc: bool,
    pub tls: bool,
}

/// Which input file of the link an object file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    One(usize),
    /// The link holds no local symbol of a file of that name.
    None,
    /// Several files of that name, and their symbols do not tell which one this is.
    Ambiguous(usize),
}

impl ModuleSymbols {
    pub fn read(data: &[u8]) -> Result<ModuleSymbols> {
        let file = ElfFile64::<object::Endianness>::parse(data).context("not an ELF module")?;
        let mut groups = vec![Group {
            file: String::new(),
            locals: HashMap::new(),
        }];
        let mut globals = HashMap::new();
        for s in file.symbols() {
            let Ok(name) = s.name() else { continue };
            if s.kind() == SymbolKind::File {
                groups.push(Group {
                    file: name.to_string(),
                    locals: HashMap::new(),
                });
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
                if let Some(g) = groups.last_mut() {
                    g.locals.entry(name.to_string()).or_default().push(def);
                }
            } else {
                globals.insert(name.to_string(), def);
            }
        }
        Ok(ModuleSymbols { groups, globals })
    }

    pub fn global(&self, name: &str) -> Option<Def> {
        self.globals.get(name).copied()
    }

    /// The one local symbol of that name in the whole module (a hidden-visibility global of
    /// another file, such as zlib's ZLIB_INTERNAL, is a local once linked).
    pub fn unique_local(&self, name: &str) -> Result<Option<Def>> {
        let mut found = self
            .groups
            .iter()
            .filter_map(|g| g.locals.get(name))
            .flatten();
        match (found.next(), found.next()) {
            (Some(one), None) => Ok(Some(*one)),
            (Some(_), Some(_)) => Err(refuse(
                RefusalKind::AmbiguousSymbol,
                format!("`{name}` is defined more than once in the module as a local symbol"),
            )),
            _ => Ok(None),
        }
    }

    /// The local definitions of `name` in input file `group`.
    pub fn local_in(&self, group: usize, name: &str) -> &[Def] {
        self.groups
            .get(group)
            .and_then(|g| g.locals.get(name))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The file name of input file `group`.
    pub fn file_of(&self, group: usize) -> &str {
        self.groups
            .get(group)
            .map(|g| g.file.as_str())
            .unwrap_or("")
    }

    /// Which input file of the link `orig` (the original object, built from the same source
    /// as the module) is. Two files may share a name (redis has two `sds.c`); then the one
    /// whose local symbols have this object's names, sizes and contents (relocated spots
    /// left out) in `module` is it.
    /// How many `rip`-relative references of the object's global functions, as the deployed
    /// code has them, land in input file `group`'s local of the referenced name: identical
    /// copies of a file still differ in which global functions call their statics.
    fn referenced_from_globals(
        &self,
        group: usize,
        orig: &Obj,
        module: &suture_module::Module,
    ) -> usize {
        let mut n = 0;
        for f in orig
            .entities
            .values()
            .filter(|e| !e.local && e.kind == SymbolKind::Text)
        {
            let Some(fd) = self.global(&f.name) else {
                continue;
            };
            for r in &f.rels {
                if !matches!(r.r_type, elf::R_X86_64_PC32 | elf::R_X86_64_PLT32) {
                    continue;
                }
                let Target::Symbol(key, _) = &r.target else {
                    continue;
                };
                let Some(l) = orig.entities.get(key).filter(|l| l.local) else {
                    continue;
                };
                let [ld] = self.local_in(group, &l.name) else {
                    continue;
                };
                let at = fd.address + r.offset;
                let Some(b) = module.bytes_at(at, 4) else {
                    continue;
                };
                let disp = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                // Where the instruction points (an immediate after the field shifts it
                // back by up to 4 bytes).
                let to = (at as i64 + 4 + i64::from(disp)) as u64;
                if to + 4 >= ld.address && to < ld.address + ld.size.max(1) + 4 {
                    n += 1;
                }
            }
        }
        n
    }

    pub fn place(&self, orig: &Obj, module: &suture_module::Module) -> Placement {
        let candidates: Vec<usize> = (0..self.groups.len())
            .filter(|&g| self.groups[g].file == orig.source_name && !orig.source_name.is_empty())
            .collect();
        match candidates.as_slice() {
            [] => return Placement::None,
            [one] => return Placement::One(*one),
            _ => {}
        }
        let mut scores = Vec::new();
        for &g in &candidates {
            let mut score = Some(0usize);
            for e in orig.entities.values().filter(|e| e.local) {
                let Some(&[def]) = self.groups[g].locals.get(&e.name).map(Vec::as_slice) else {
                    continue;
                };
                if def.size != e.size {
                    score = None;
                    break;
                }
                if e.nobits || e.tls || e.data.is_empty() {
                    score = score.map(|s| s + 1);
                    continue;
                }
                match module.bytes_at(def.address, e.data.len() as u64) {
                    Some(bytes) if e.same_bytes_as_linked(bytes) => score = score.map(|s| s + 1),
                    Some(_) => {
                        score = None;
                        break;
                    }
                    None => {}
                }
            }
            scores.push((
                g,
                score.map(|s| (self.referenced_from_globals(g, orig, module), s)),
            ));
        }
        let best = scores
            .iter()
            .filter_map(|(_, s)| *s)
            .max()
            .unwrap_or((0, 0));
        let winners: Vec<usize> = scores
            .iter()
            .filter(|(_, s)| *s == Some(best) && best != (0, 0))
            .map(|(g, _)| *g)
            .collect();
        match winners.as_slice() {
            [one] => Placement::One(*one),
            _ => Placement::Ambiguous(candidates.len()),
        }
    }
}

/// How the symbols of one changed object file bind to the deployed module: through the
/// original object (same source, same gcc numbering as the module), never by the patched
/// object's own numbered names.
pub struct UnitBinding<'a, 'd> {
    pub module: &'a ModuleSymbols,
    /// The original object (an empty one for a file the fix adds).
    pub orig: &'a Obj<'d>,
    pub patched: &'a Obj<'d>,
    pub placement: Placement,
    /// The source file, relative to the tree, for messages.
    pub label: String,
}

impl UnitBinding<'_, '_> {
    /// The deployed definition of the entity with correlation key `key`; `None` when the
    /// module has none (the entity is new, or the deployed link discarded it).
    pub fn by_key(&self, key: &str) -> Result<Option<Def>> {
        let Some(o) = self.orig.entities.get(key) else {
            return Ok(None);
        };
        let names: Vec<&str> = std::iter::once(o.name.as_str())
            .chain(o.aliases.iter().map(String::as_str))
            .collect();
        if !o.local {
            if let Some(d) = names.iter().find_map(|n| self.module.global(n)) {
                return Ok(Some(d));
            }
        }
        match self.placement {
            Placement::One(g) => {
                for n in &names {
                    match self.module.local_in(g, n) {
                        [] => continue,
                        [d] => {
                            if is_numbered(n) && d.size != o.size {
                                return Err(refuse(
                                    RefusalKind::AmbiguousSymbol,
                                    format!(
                                        "`{n}` of {} is {} bytes in the module but {} in the rebuilt object: gcc numbered the function-local statics differently",
                                        self.label, d.size, o.size
                                    ),
                                ));
                            }
                            return Ok(Some(*d));
                        }
                        many => {
                            return Err(refuse(
                                RefusalKind::AmbiguousSymbol,
                                format!(
                                    "`{n}` of {} is defined {} times in that file's part of the module",
                                    self.label,
                                    many.len()
                                ),
                            ))
                        }
                    }
                }
            }
            Placement::Ambiguous(k) => {
                return Err(refuse(
                    RefusalKind::AmbiguousSymbol,
                    format!(
                        "`{}` of {}: the module holds {k} files named {} and their symbols do not tell which one this is",
                        o.name, self.label, self.orig.source_name
                    ),
                ))
            }
            Placement::None => {}
        }
        if !o.local {
            for n in &names {
                if let Some(d) = self.module.unique_local(n)? {
                    return Ok(Some(d));
                }
            }
        }
        Ok(None)
    }

    /// The deployed definition of a symbol defined in the patched object.
    pub fn by_symbol(&self, idx: SymbolIndex) -> Result<Option<Def>> {
        if let Some(key) = self.patched.keys.get(&idx) {
            return self.by_key(key);
        }
        let sym = self.patched.file.symbol_by_index(idx)?;
        let name = sym.name().unwrap_or("");
        if !sym.is_local() {
            if let Some(d) = self.module.global(name) {
                return Ok(Some(d));
            }
        }
        if let Placement::One(g) = self.placement {
            if let [d] = self.module.local_in(g, name) {
                return Ok(Some(*d));
            }
        }
        Ok(None)
    }

    /// The definition of a symbol the patched object uses but does not define: another file
    /// of the module, if it has it.
    pub fn undefined(&self, name: &str) -> Result<Option<Def>> {
        match self.module.global(name) {
            Some(d) => Ok(Some(d)),
            None => self.module.unique_local(name),
        }
    }
}
