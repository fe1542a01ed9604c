//! The modules (ELF executables and shared libraries) a process has mapped, identified by
//! GNU build-id, with the load bias that turns link-time addresses into runtime addresses.
//!
//! Two levels of knowledge about a file, each read at most once and cached by (device, inode,
//! size, mtime), shared by every process that maps the file:
//! - its **identity** (build-id, kind, segments: [`suture_module::identify`]), a few KB read
//!   from its headers: enough to find a module by build-id, so scanning a host costs what its
//!   build-ids cost, however big the binaries of unrelated processes are;
//! - its **facts** (headers and tables: symbols, exports), read only for modules of a process
//!   being patched; its **unwind tables** apart and later ([`read_unwind`]), only when a stack
//!   must be walked precisely (most stacks never point into the code being patched at all).
//!
//! The files belong to processes we do not trust, and we read them as root. A mapped file is
//! opened through `/proc/PID/map_files` (the process's own view), and read only if it is a
//! regular file whose device and inode are the ones `/proc/PID/maps` gives for the mapping: a
//! process that replaced the file with a FIFO, a device or another file gets it skipped.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use anyhow::{anyhow, bail, Context, Result};
use suture_module::{
    Identity, LoadSegment, Module, ModuleKind, Symbol, SymbolBinding, SymbolKind, Tables,
    TlsSegment,
};

use crate::procfs::Mapping;
use crate::unwind::Unwind;

/// Modules larger than this are not read (a sanity bound on someone else's file).
const MAX_MODULE_BYTES: u64 = 2 << 30;

/// What we need to know about one ELF file, read once.
pub struct ModuleFacts {
    pub build_id: Option<Vec<u8>>,
    pub kind: ModuleKind,
    pub segments: Vec<LoadSegment>,
    pub tls: Option<TlsSegment>,
    /// Which file was read: its unwind tables must come from the same one.
    key: FileKey,
    /// `.eh_frame` tables, for walking stacks precisely, once read ([`read_unwind`]); `None`
    /// inside when the module has none.
    unwind: OnceLock<Option<Unwind>>,
    /// The file's bytes where [`suture_module::read_tables`] read them; zero elsewhere.
    data: Vec<u8>,
    /// Read from `data` when first asked (see [`ModuleFacts::symbols`]), once.
    symbols: OnceLock<Vec<Symbol>>,
    exports: OnceLock<HashMap<Box<str>, Export>>,
    /// Lookups answered by a scan so far (see [`ModuleFacts::export`]).
    lookups: std::sync::atomic::AtomicU32,
}

/// Names looked up by a scan of the symbols before the module's export map is built.
const SCANNED_LOOKUPS: u32 = 16;

/// A symbol the module exports through `.dynsym`.
#[derive(Debug, Clone, Copy)]
pub struct Export {
    pub address: u64,
    pub ifunc: bool,
    pub weak: bool,
}

impl ModuleFacts {
    fn read(data: Vec<u8>, key: FileKey) -> Result<ModuleFacts> {
        let module = Module::parse_layout(&data)?;
        let build_id = module.build_id().map(<[u8]>::to_vec);
        let kind = module.kind();
        let segments = module.load_segments().to_vec();
        let tls = module.tls_segment();
        drop(module);
        Ok(ModuleFacts {
            build_id,
            kind,
            segments,
            tls,
            key,
            unwind: OnceLock::new(),
            data,
            symbols: OnceLock::new(),
            exports: OnceLock::new(),
            lookups: Default::default(),
        })
    }

    /// The module's symbols, read on first use: most modules of a process are only walked
    /// through (unwinding a stack) and never pay for theirs (libc: 3,000, a `String` each).
    fn symbols(&self) -> &[Symbol] {
        self.symbols
            .get_or_init(|| match suture_module::read_symbols(&self.data) {
                Ok((symbols, _)) => symbols,
                Err(e) => {
                    tracing::debug!(error = %e, "a module's symbol table is unusable: no symbols");
                    Vec::new()
                }
            })
    }

    /// The module's unwind tables, if they have been read ([`read_unwind`]) and it has any.
    pub fn unwind(&self) -> Option<&Unwind> {
        self.unwind.get().and_then(Option::as_ref)
    }

    /// Whether [`read_unwind`] has read the module's unwind tables (or found it has none).
    pub fn unwind_read(&self) -> bool {
        self.unwind.get().is_some()
    }

    /// The one function named `name` in the module's full symbol table (exported or not), for
    /// what a static executable links in but exports nowhere.
    pub fn function(&self, name: &str) -> Option<u64> {
        match suture_module::lookup_in(self.symbols(), name) {
            suture_module::Lookup::Unique(s) if matches!(s.kind, SymbolKind::Function) => {
                Some(s.address)
            }
            _ => None,
        }
    }

    /// The exported definition of `name`, if this module has one.
    pub fn export(&self, name: &str) -> Option<Export> {
        // A one-off command asks a few names: a lookup each beats building the map (libc:
        // ~3,000 entries, most of a millisecond). A long-lived caller gets the map.
        if self.exports.get().is_none()
            && self
                .lookups
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                < SCANNED_LOOKUPS
        {
            let export = |found: &Symbol| Export {
                address: found.address,
                ifunc: matches!(found.kind, SymbolKind::Ifunc),
                weak: matches!(found.binding, SymbolBinding::Weak),
            };
            // Through the GNU hash table, as the loader does, without reading every symbol.
            if let Some(found) = suture_module::lookup_dynamic_hashed(&self.data, name) {
                return found.as_ref().map(export);
            }
            return suture_module::lookup_dynamic_in(self.symbols(), name).map(export);
        }
        let exports = self.exports.get_or_init(|| {
            let chosen = suture_module::dynamic_exports_in(self.symbols());
            let mut map = HashMap::with_capacity(chosen.len());
            for (name, found) in chosen {
                let export = Export {
                    address: found.address,
                    ifunc: matches!(found.kind, SymbolKind::Ifunc),
                    weak: matches!(found.binding, SymbolBinding::Weak),
                };
                map.insert(Box::<str>::from(name), export);
            }
            map
        });
        exports.get(name).copied()
    }
}

/// The lowest and highest link-time address the module occupies.
fn vaddr_range(segments: &[LoadSegment]) -> (u64, u64) {
    let lo = segments.iter().map(|s| s.vaddr & !0xfff).min();
    let hi = segments.iter().map(|s| s.vaddr.wrapping_add(s.memsz)).max();
    (lo.unwrap_or(0), hi.unwrap_or(0))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

/// A cache entry, filled once even when several threads ask at the same time (`apply --all`
/// works on several processes at once); a failure is remembered too (a font or a locale
/// archive is not ELF, whoever maps it).
type Slot<T> = Arc<OnceLock<Result<Arc<T>, String>>>;
/// Each entry with the generation ([`evict_unused_files`]) in which it was last asked for.
type Cache<T> = Mutex<HashMap<FileKey, (Slot<T>, u64)>>;

/// The current cache generation: a long-running caller (the agent) starts one per pass.
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn identities() -> &'static Cache<Identity> {
    static CACHE: OnceLock<Cache<Identity>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn full_facts() -> &'static Cache<ModuleFacts> {
    static CACHE: OnceLock<Cache<ModuleFacts>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn slot<T>(cache: &Cache<T>, key: FileKey) -> Slot<T> {
    // A panic while holding the lock cannot leave the map half-changed: recover it.
    let mut map = cache.lock().unwrap_or_else(PoisonError::into_inner);
    let entry = map.entry(key).or_default();
    entry.1 = GENERATION.load(std::sync::atomic::Ordering::Relaxed);
    entry.0.clone()
}

/// Starts a new cache generation and forgets the files nobody asked for in the last `keep`
/// generations (a package update or a process that is gone leaves its files behind). What an
/// operation in progress holds stays valid: entries are shared, only the cache lets go.
pub fn evict_unused_files(keep: u64) {
    let now = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let oldest = now.saturating_sub(keep);
    evict(identities(), oldest);
    evict(full_facts(), oldest);
}

fn evict<T>(cache: &Cache<T>, oldest: u64) {
    cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|_, (_, used)| *used >= oldest);
}

/// How many files the caches hold (identities, full reads).
#[doc(hidden)]
pub fn cached_files() -> (usize, usize) {
    (
        identities()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len(),
        full_facts()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len(),
    )
}

fn fill<T>(
    cache: &Cache<T>,
    found: &Found,
    read: impl FnOnce(&File) -> Result<T>,
) -> Result<Arc<T>> {
    let slot = slot(cache, found.key);
    if let Some(done) = slot.get() {
        return done.clone().map_err(|e| anyhow!(e));
    }
    // Not remembered if it fails: the process may just have exited, others map the file too.
    let file = found.open()?;
    let result = slot.get_or_init(|| read(&file).map(Arc::new).map_err(|e| format!("{e:#}")));
    result.clone().map_err(|e| anyhow!(e))
}

/// Forgets every file read so far (benchmarks measure cold scans with it).
#[doc(hidden)]
pub fn forget_cached_files() {
    identities()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear();
    full_facts()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear();
}

/// Whether the file with this device and inode has been read for its tables (symbols and
/// versions; the unwind tables come later, if at all). Lets tests check that a scan did not.
#[doc(hidden)]
pub fn fully_read(dev: u64, ino: u64) -> bool {
    full_facts()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .keys()
        .any(|k| k.dev == dev && k.ino == ino)
}

/// How a mapped file is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// `/proc/PID/map_files/START-END`: the kernel's own reference to the mapped file (needs
    /// CAP_SYS_ADMIN).
    MapFiles,
    /// `/proc/PID/root/PATH`: the name in the process's mount namespace, which the process may
    /// have pointed at something else since it mapped the file.
    Root,
}

/// A mapped file, found and checked by name (a `stat`, which never opens it), but not opened:
/// a scan that finds the file in the cache costs one system call.
struct Found {
    path: PathBuf,
    key: FileKey,
}

impl Found {
    /// Opens the checked file for reading. An `O_PATH` handle pins the file without opening
    /// it (no FIFO wait, no device driver's open); once it is the file that was checked, it is
    /// reopened for reading through itself, so what is read is what was checked whatever
    /// happens to the name meanwhile.
    fn open(&self) -> Result<File> {
        let handle = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        let meta = handle.metadata()?;
        if !meta.file_type().is_file() || key_of(&meta) != self.key {
            bail!("{} changed since it was checked", self.path.display());
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
            .with_context(|| format!("cannot reopen {}", self.path.display()))?;
        Ok(file)
    }
}

fn key_of(meta: &std::fs::Metadata) -> FileKey {
    FileKey {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime: meta.mtime(),
        mtime_nsec: meta.mtime_nsec(),
    }
}

/// The `major:minor` (hexadecimal) of a maps line.
fn device_of(mapping: &Mapping) -> Option<(u32, u32)> {
    let (major, minor) = mapping.dev.split_once(':')?;
    Some((
        u32::from_str_radix(major, 16).ok()?,
        u32::from_str_radix(minor, 16).ok()?,
    ))
}

/// Filesystems on which `stat` and `/proc/PID/maps` disagree about a file's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Disagreement {
    /// btrfs and bcachefs give each subvolume its own device number in `stat`; maps prints
    /// the filesystem's. The inode numbers agree.
    Device,
    /// Before Linux 6.8, maps gives an overlayfs file's real (layer) device and inode, `stat`
    /// the overlay's.
    DeviceAndInode,
}

fn disagreement(path: &std::path::Path) -> Option<Disagreement> {
    const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
    const BCACHEFS_SUPER_MAGIC: i64 = 0xca45_1a4e;
    const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: `statfs` is plain data, valid when zeroed; `statfs()` reads the NUL-terminated
    // path and only writes into the struct.
    let f_type = unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        if libc::statfs(path.as_ptr(), &mut fs) != 0 {
            return None;
        }
        fs.f_type as i64
    };
    match f_type {
        BTRFS_SUPER_MAGIC | BCACHEFS_SUPER_MAGIC => Some(Disagreement::Device),
        OVERLAYFS_SUPER_MAGIC => Some(Disagreement::DeviceAndInode),
        _ => None,
    }
}

/// Finds the file behind `mapping` by `route` and checks that it is a regular file and the
/// one the mapping names.
fn find_via(pid: i32, mapping: &Mapping, route: Route) -> Result<Found> {
    let path: PathBuf = match route {
        Route::MapFiles => mapping.map_file(pid),
        Route::Root => format!("/proc/{pid}/root{}", mapping.path).into(),
    };
    let meta = std::fs::metadata(&path)
        .with_context(|| format!("process {pid}: cannot stat {}", path.display()))?;
    if !meta.file_type().is_file() {
        bail!(
            "process {pid}: {} is not a regular file now; not reading it",
            mapping.path
        );
    }
    let (major, minor) = device_of(mapping)
        .with_context(|| format!("process {pid}: bad device {:?} in maps", mapping.dev))?;
    let same_inode = meta.ino() == mapping.inode;
    let same = same_inode && libc::major(meta.dev()) == major && libc::minor(meta.dev()) == minor;
    if !same {
        // map_files is resolved by the kernel from the mapping itself, so a filesystem that
        // shows stat and maps different numbers for one file is no sign of a swap there. By
        // name, it would be: another subvolume can hold another file with the same inode.
        let excused = route == Route::MapFiles
            && match disagreement(&path) {
                Some(Disagreement::Device) => same_inode,
                Some(Disagreement::DeviceAndInode) => true,
                None => false,
            };
        if !excused {
            bail!(
                "process {pid}: {} is not the file it mapped (device and inode differ): \
                 not reading it",
                mapping.path
            );
        }
        tracing::debug!(pid, path = %mapping.path, "maps and stat number this filesystem's files differently");
    }
    Ok(Found {
        path,
        key: key_of(&meta),
    })
}

/// The file behind `mapping`, through map_files, or through the process's root if map_files
/// cannot be used (no CAP_SYS_ADMIN, or the mapping is gone).
fn find_mapped(pid: i32, mapping: &Mapping) -> Result<Found> {
    match find_via(pid, mapping, Route::MapFiles) {
        // Only a failure to reach the file falls back; a file that fails the checks is skipped.
        Err(e) if e.root_cause().is::<std::io::Error>() => {
            // A main thread that exited has no map_files: a live thread's has.
            if let Some(dir) = crate::procfs::memory_dir(pid).filter(|&d| d != pid) {
                return find_via(dir, mapping, Route::MapFiles);
            }
            tracing::debug!(pid, error = %format!("{e:#}"), "map_files unusable; trying the process's root");
            find_via(pid, mapping, Route::Root)
        }
        other => other,
    }
}

/// The identity (build-id, kind, segments) of the file behind `mapping` in process `pid`:
/// its headers, a few KB, read once per file.
pub fn identity(pid: i32, mapping: &Mapping) -> Result<Arc<Identity>> {
    let found = find_mapped(pid, mapping)?;
    fill(identities(), &found, |file| {
        let id = suture_module::identify(
            &|offset, buf: &mut [u8]| file.read_exact_at(buf, offset),
            found.key.size,
        )
        .with_context(|| format!("{}: not a usable ELF module", mapping.path))?;
        Ok(id)
    })
}

/// Reads (or recalls) the facts of the file behind `mapping` in process `pid`: its headers and
/// tables (symbols, versions; not its unwind tables, not its code), once per file.
pub fn facts(pid: i32, mapping: &Mapping) -> Result<Arc<ModuleFacts>> {
    let found = find_mapped(pid, mapping)?;
    fill(full_facts(), &found, |file| {
        let data = read_part(file, found.key.size, mapping, Tables::SYMBOLS)?;
        ModuleFacts::read(data, found.key)
            .with_context(|| format!("{}: not a usable ELF module", mapping.path))
    })
}

fn read_part(file: &File, size: u64, mapping: &Mapping, which: Tables) -> Result<Vec<u8>> {
    if size > MAX_MODULE_BYTES {
        bail!("{}: {size} bytes is too large for a module", mapping.path);
    }
    suture_module::read_tables(&|offset, buf| file.read_exact_at(buf, offset), size, which)
        .with_context(|| format!("{}: not a usable ELF module", mapping.path))
}

/// Reads the unwind tables of `module` (mapped by process `pid`) from the file its facts
/// came from, once per file; the caller reads them before it stops anything. A file that is
/// not the one read before is not read (its module is then walked conservatively).
pub fn read_unwind(pid: i32, module: &LoadedModule) -> Result<()> {
    let facts = &module.facts;
    if facts.unwind_read() {
        return Ok(());
    }
    let found = find_mapped(pid, &module.mapping)?;
    if found.key != facts.key {
        bail!("{}: the file changed since it was read", module.path);
    }
    let data = read_part(
        &found.open()?,
        found.key.size,
        &module.mapping,
        Tables::UNWIND,
    )?;
    let unwind =
        Unwind::read(data).with_context(|| format!("{}: not a usable ELF module", module.path))?;
    // Another job may have read it meanwhile: the same file gives the same tables.
    let _ = facts.unwind.set(unwind);
    Ok(())
}

/// Up to `len` bytes at `offset` of the file behind `mapping` in process `pid`, read now (for
/// code, which [`facts`] leaves out); fewer where the file ends (a mapping's last page may
/// reach past it).
pub fn file_range(pid: i32, mapping: &Mapping, offset: u64, len: usize) -> Result<Vec<u8>> {
    let file = find_mapped(pid, mapping)?.open()?;
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", mapping.path)),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// A module as mapped in one process.
#[derive(Clone)]
pub struct LoadedModule {
    pub path: String,
    pub facts: Arc<ModuleFacts>,
    /// The mapping the load bias comes from: how the file is reached again.
    pub mapping: Mapping,
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

/// The mapping with the lowest file offset of each file the process maps (by device and
/// inode), the one the load bias is computed from.
fn mapped_files(maps: &[Mapping]) -> Vec<&Mapping> {
    let mut firsts: Vec<&Mapping> = Vec::new();
    // (A JIT or a database can map thousands of ranges.)
    let mut index: HashMap<(&str, u64), usize> = HashMap::new();
    // Patch memory is a file too, but never a module: not read, not an error to report.
    for m in maps
        .iter()
        .filter(|m| m.is_file() && !crate::record::is_patch_memory(m))
    {
        match index.entry((m.dev.as_str(), m.inode)) {
            std::collections::hash_map::Entry::Occupied(i) => {
                let first = &mut firsts[*i.get()];
                if m.offset < first.offset {
                    *first = m;
                }
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(firsts.len());
                firsts.push(m);
            }
        }
    }
    firsts
}

fn loaded(first: &Mapping, facts: Arc<ModuleFacts>, bias: u64) -> LoadedModule {
    let (lo, hi) = vaddr_range(&facts.segments);
    LoadedModule {
        path: first.path.trim_end_matches(" (deleted)").to_string(),
        bias,
        lo: bias.wrapping_add(lo),
        hi: bias.wrapping_add(hi),
        dev: first.dev.clone(),
        inode: first.inode,
        mapping: first.clone(),
        facts,
    }
}

/// Every ELF module mapped in the process (files that aren't ELF are skipped), each read
/// whole: for a process being patched.
pub fn loaded_modules(pid: i32, maps: &[Mapping]) -> Vec<LoadedModule> {
    let mut modules = Vec::new();
    for first in mapped_files(maps) {
        let facts = match facts(pid, first) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(pid, error = %format!("{e:#}"), "skipping a mapped file");
                continue;
            }
        };
        let Some(bias) = bias_of(&facts.segments, first) else {
            continue;
        };
        modules.push(loaded(first, facts, bias));
    }
    modules
}

/// The module whose mappings contain `addr`, read whole.
pub fn module_at(pid: i32, maps: &[Mapping], addr: u64) -> Result<LoadedModule> {
    let hit = maps
        .iter()
        .find(|m| m.is_file() && m.contains(addr))
        .ok_or_else(|| anyhow::anyhow!("no file is mapped at {addr:#x}"))?;
    let first = mapped_files(maps)
        .into_iter()
        .find(|m| m.dev == hit.dev && m.inode == hit.inode)
        .ok_or_else(|| anyhow::anyhow!("no file is mapped at {addr:#x}"))?;
    let facts = facts(pid, first)?;
    let bias = bias_of(&facts.segments, first)
        .ok_or_else(|| anyhow::anyhow!("{}: mapping matches no segment", first.path))?;
    Ok(loaded(first, facts, bias))
}

/// Every ELF module mapped in the process as (path, build-id, load bias), from the files'
/// identities alone (headers and notes: what `check` and a host scan need).
pub fn identified_modules(pid: i32, maps: &[Mapping]) -> Vec<(String, Option<Vec<u8>>, u64)> {
    mapped_files(maps)
        .into_iter()
        .filter_map(|first| {
            let id = identity(pid, first).ok()?;
            let bias = bias_of(&id.segments, first)?;
            Some((
                first.path.trim_end_matches(" (deleted)").to_string(),
                id.build_id.clone(),
                bias,
            ))
        })
        .collect()
}

/// The mapping (and load bias) of the module with `build_id` in the process, from the files'
/// identities alone.
fn locate<'m>(pid: i32, maps: &'m [Mapping], build_id: &[u8]) -> Option<(&'m Mapping, u64)> {
    mapped_files(maps).into_iter().find_map(|first| {
        let id = match identity(pid, first) {
            Ok(id) => id,
            Err(e) => {
                tracing::debug!(pid, error = %format!("{e:#}"), "skipping a mapped file");
                return None;
            }
        };
        if id.build_id.as_deref() != Some(build_id) {
            return None;
        }
        Some((first, bias_of(&id.segments, first)?))
    })
}

/// Whether the process maps a module with `build_id`: reads only the headers of the files it
/// maps (and each file once for all processes), for scanning a whole host.
pub fn maps_build_id(pid: i32, maps: &[Mapping], build_id: &[u8]) -> bool {
    locate(pid, maps, build_id).is_some()
}

/// Where each loaded copy of the module with `build_id` begins (its load bias), one per copy:
/// a library opened under two paths (a bundled copy of a system library) or into a second
/// `dlmopen` namespace is loaded twice, with its own code and its own data. Counted by its
/// executable mappings, so a program reading its own file through `mmap` is not a copy.
pub fn loaded_copies(pid: i32, maps: &[Mapping], build_id: &[u8]) -> Vec<u64> {
    match locate(pid, maps, build_id) {
        Some((first, _)) => copies_of(pid, maps, build_id, (&first.dev, first.inode)),
        None => Vec::new(),
    }
}

/// [`loaded_copies`] of `module`, found already.
pub fn copies_of_module(pid: i32, maps: &[Mapping], module: &LoadedModule) -> Vec<u64> {
    match module.facts.build_id.as_deref() {
        Some(id) => copies_of(pid, maps, id, (&module.dev, module.inode)),
        None => Vec::new(),
    }
}

fn copies_of(pid: i32, maps: &[Mapping], build_id: &[u8], (dev, inode): (&str, u64)) -> Vec<u64> {
    // A copy maps its code exactly as the first does (same file offset and length): only
    // such mappings are worth identifying.
    let code: Vec<(u64, u64)> = maps
        .iter()
        .filter(|m| m.executable && m.dev == dev && m.inode == inode)
        .map(|m| (m.offset, m.end - m.start))
        .collect();
    let mut biases: Vec<u64> = Vec::new();
    for m in maps
        .iter()
        .filter(|m| m.executable && m.is_file())
        .filter(|m| code.contains(&(m.offset, m.end - m.start)))
    {
        let Ok(id) = identity(pid, m) else {
            continue;
        };
        if id.build_id.as_deref() != Some(build_id) {
            continue;
        }
        if let Some(bias) = bias_of(&id.segments, m) {
            if !biases.contains(&bias) {
                biases.push(bias);
            }
        }
    }
    biases
}

/// The module with `build_id` in the process, read whole (the process is about to be
/// patched); the other files it maps are only identified.
pub fn find_by_build_id(pid: i32, maps: &[Mapping], build_id: &[u8]) -> Option<LoadedModule> {
    let (first, _) = locate(pid, maps, build_id)?;
    match facts(pid, first) {
        Ok(facts) if facts.build_id.as_deref() == Some(build_id) => {
            let bias = bias_of(&facts.segments, first)?;
            Some(loaded(first, facts, bias))
        }
        Ok(_) => {
            tracing::warn!(pid, path = %first.path, "module changed while being read");
            None
        }
        Err(e) => {
            tracing::warn!(pid, error = %format!("{e:#}"), "the module with the build-id cannot be read");
            None
        }
    }
}

fn bias_of(segments: &[LoadSegment], mapping: &Mapping) -> Option<u64> {
    let seg = segments
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procfs::parse_maps;

    #[test]
    fn maps_devices_are_hexadecimal_major_minor() {
        let maps = parse_maps(
            "1000-2000 r--p 00000000 fe:01 7 /a\n\
             2000-3000 r--p 00000000 103:1f 7 /b\n\
             3000-4000 r--p 00000000 zz:01 7 /c\n",
        )
        .expect("maps");
        assert_eq!(device_of(&maps[0]), Some((0xfe, 1)));
        assert_eq!(device_of(&maps[1]), Some((0x103, 0x1f)));
        assert_eq!(device_of(&maps[2]), None);
    }

    #[test]
    fn one_mapping_per_file_the_lowest_offset() {
        let maps = parse_maps(
            "2000-3000 r-xp 00001000 fe:01 7 /lib/a.so\n\
             1000-2000 r--p 00000000 fe:01 7 /lib/a.so\n\
             3000-4000 rw-p 00000000 00:00 0\n\
             4000-5000 r--p 00000000 fe:02 7 /lib/b.so\n\
             5000-6000 rw-p 00000000 00:00 0 [heap]\n\
             6000-7000 r--p 00000000 00:01 9 /memfd:suture:fix-L1 (deleted)\n\
             7000-8000 r-xp 00001000 00:01 9 /memfd:suture:fix-L1 (deleted)\n\
             8000-9000 r-xp 00000000 00:01 10 /memfd:jit (deleted)\n",
        )
        .expect("maps");
        let files = mapped_files(&maps);
        assert_eq!(
            files.len(),
            3,
            "same inode on another device is another file; patch memory is no module"
        );
        assert_eq!((files[0].start, files[0].offset), (0x1000, 0));
        assert_eq!(files[1].path, "/lib/b.so");
        assert_eq!(files[2].path, "/memfd:jit (deleted)");
    }
}
