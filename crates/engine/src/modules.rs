//! The modules (ELF executables and shared libraries) a process has mapped, identified by
//! GNU build-id, with the load bias that turns link-time addresses into runtime addresses.
//!
//! Facts about a file are cached by (device, inode, size, mtime): patching a thousand copies of
//! one service reads its binary once.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result};
use suture_module::{LoadSegment, Module, ModuleKind, SymbolBinding, SymbolKind, TlsSegment};

use crate::procfs::{self, Mapping};

/// Modules larger than this are not read (a sanity bound on someone else's file).
const MAX_MODULE_BYTES: u64 = 2 << 30;

/// What we need to know about one ELF file, read once.
pub struct ModuleFacts {
    pub build_id: Option<Vec<u8>>,
    pub kind: ModuleKind,
    pub segments: Vec<LoadSegment>,
    pub tls: Option<TlsSegment>,
    /// `.eh_frame` tables, for walking stacks precisely.
    pub unwind: Option<crate::unwind::UnwindTables>,
    data: Vec<u8>,
    exports: OnceLock<HashMap<String, Export>>,
}

/// A symbol the module exports through `.dynsym`.
#[derive(Debug, Clone, Copy)]
pub struct Export {
    pub address: u64,
    pub ifunc: bool,
    pub weak: bool,
}

impl ModuleFacts {
    fn read(data: Vec<u8>) -> Result<ModuleFacts> {
        let module = Module::parse(&data)?;
        Ok(ModuleFacts {
            build_id: module.build_id().map(<[u8]>::to_vec),
            kind: module.kind(),
            segments: module.load_segments().to_vec(),
            tls: module.tls_segment(),
            unwind: crate::unwind::tables(&module, &data),
            exports: OnceLock::new(),
            data,
        })
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The one function named `name` in the module's full symbol table (exported or not), for
    /// what a static executable links in but exports nowhere.
    pub fn function(&self, name: &str) -> Option<u64> {
        let module = Module::parse(&self.data).ok()?;
        match module.lookup(name) {
            suture_module::Lookup::Unique(s) if matches!(s.kind, SymbolKind::Function) => {
                Some(s.address)
            }
            _ => None,
        }
    }

    /// The exported definition of `name`, if this module has one.
    pub fn export(&self, name: &str) -> Option<Export> {
        let exports = self.exports.get_or_init(|| {
            let mut map = HashMap::new();
            if let Ok(module) = Module::parse(&self.data) {
                for (name, found) in module.dynamic_exports() {
                    map.insert(
                        name.to_string(),
                        Export {
                            address: found.address,
                            ifunc: matches!(found.kind, SymbolKind::Ifunc),
                            weak: matches!(found.binding, SymbolBinding::Weak),
                        },
                    );
                }
            }
            map
        });
        exports.get(name).copied()
    }

    /// The lowest and highest link-time address the module occupies.
    fn vaddr_range(&self) -> (u64, u64) {
        let lo = self.segments.iter().map(|s| s.vaddr & !0xfff).min();
        let hi = self.segments.iter().map(|s| s.vaddr + s.memsz).max();
        (lo.unwrap_or(0), hi.unwrap_or(0))
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
}

fn cache() -> &'static Mutex<HashMap<FileKey, Arc<ModuleFacts>>> {
    static CACHE: OnceLock<Mutex<HashMap<FileKey, Arc<ModuleFacts>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Reads (or recalls) the facts of the file behind `mapping` in process `pid`.
pub fn facts(pid: i32, mapping: &Mapping) -> Result<Arc<ModuleFacts>> {
    let mut path = mapping.map_file(pid);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(_) => {
            // map_files needs CAP_SYS_ADMIN; the process's root view is the fallback.
            path = format!("/proc/{pid}/root{}", mapping.path).into();
            std::fs::metadata(&path)
                .with_context(|| format!("process {pid}: cannot open {}", mapping.path))?
        }
    };
    let key = FileKey {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime: meta.mtime(),
    };
    if let Some(found) = cache().lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(found);
    }
    let data = procfs::read_bounded(&path, MAX_MODULE_BYTES)?;
    let facts = Arc::new(
        ModuleFacts::read(data)
            .with_context(|| format!("{}: not a usable ELF module", mapping.path))?,
    );
    if let Ok(mut c) = cache().lock() {
        c.insert(key, facts.clone());
    }
    Ok(facts)
}

/// A module as mapped in one process.
#[derive(Clone)]
pub struct LoadedModule {
    pub path: String,
    pub facts: Arc<ModuleFacts>,
    /// runtime address = bias + link-time address
    pub bias: u64,
    /// Runtime extent of the module (including its bss).
    pub lo: u64,
    pub hi: u64,
    pub dev: String,
    pub inode: u64,
}

impl LoadedModule {
    pub fn build_id_hex(&self) -> Option<String> {
        self.facts.build_id.as_deref().map(hex::encode)
    }
}

/// Every ELF module mapped in the process (files that aren't ELF are skipped).
pub fn loaded_modules(pid: i32, maps: &[Mapping]) -> Vec<LoadedModule> {
    let mut groups: Vec<(&str, u64, Vec<&Mapping>)> = Vec::new();
    for m in maps.iter().filter(|m| m.is_file()) {
        match groups
            .iter_mut()
            .find(|(dev, ino, _)| *dev == m.dev && *ino == m.inode)
        {
            Some(g) => g.2.push(m),
            None => groups.push((&m.dev, m.inode, vec![m])),
        }
    }
    let mut modules = Vec::new();
    for (_, _, group) in groups {
        let Some(first) = group.iter().min_by_key(|m| m.offset) else {
            continue;
        };
        let Ok(facts) = facts(pid, first) else {
            continue;
        };
        let Some(bias) = bias_of(&facts, first) else {
            continue;
        };
        let (lo, hi) = facts.vaddr_range();
        modules.push(LoadedModule {
            path: first.path.trim_end_matches(" (deleted)").to_string(),
            bias,
            lo: bias.wrapping_add(lo),
            hi: bias.wrapping_add(hi),
            dev: first.dev.clone(),
            inode: first.inode,
            facts,
        });
    }
    modules
}

/// Cheap test for `--all`: does any file mapped by `pid` carry this build-id?
pub fn find_by_build_id(pid: i32, maps: &[Mapping], build_id: &[u8]) -> Option<LoadedModule> {
    loaded_modules(pid, maps)
        .into_iter()
        .find(|m| m.facts.build_id.as_deref() == Some(build_id))
}

fn bias_of(facts: &ModuleFacts, mapping: &Mapping) -> Option<u64> {
    let seg = facts
        .segments
        .iter()
        .find(|s| s.offset & !0xfff == mapping.offset)?;
    Some(mapping.start.wrapping_sub(seg.vaddr & !0xfff))
}

/// The TP-relative offset of a TLS variable at `offset` in the main executable's TLS block
/// (x86-64 TLS variant II: the executable's block ends at the thread pointer).
pub fn executable_tp_offset(tls: &TlsSegment, offset: u64) -> Option<i64> {
    if tls.align > 1 && !tls.vaddr.is_multiple_of(tls.align) {
        return None; // glibc would add a first-byte offset we do not model
    }
    let align = tls.align.max(1);
    let block = tls.memsz.div_ceil(align) * align;
    Some(offset as i64 - block as i64)
}
