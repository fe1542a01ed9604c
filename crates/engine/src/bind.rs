//! Resolving what a patch refers to in one process: the running module's own functions and
//! data (by address), its thread-locals, and the exports of the libraries it has loaded, in the
//! dynamic loader's search order. All of it is read before anything in the process stops.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

use suture_bundle::{BindTarget, Bundle};
use suture_link::{Plan, Resolved};

use crate::modules::{self, executable_tp_offset, LoadedModule};
use crate::procfs::Mapping;
use crate::{refused, EngineError};

/// What the patch's undefined symbols resolve to in this process.
pub(crate) struct Symbols {
    pub(crate) known: HashMap<String, Resolved>,
    /// Indirect functions still to be resolved by calling their resolver in the target.
    pub(crate) ifuncs: Vec<(String, u64)>,
}

impl Symbols {
    pub(crate) fn lookup(&self, name: &str) -> Option<Resolved> {
        if let Some(r) = self.known.get(name) {
            return Some(*r);
        }
        // Before resolvers ran (dry link), the resolver's address stands in: same reach.
        self.ifuncs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| Resolved::Address(*a))
    }
}

pub(crate) fn resolve_bindings(
    pid: i32,
    maps: &[Mapping],
    module: &LoadedModule,
    bundle: &Bundle,
    plan: &Plan,
) -> Result<Symbols, EngineError> {
    let mut symbols = Symbols {
        known: HashMap::new(),
        ifuncs: Vec::new(),
    };
    let mut loaded: Option<Vec<LoadedModule>> = None;
    for name in plan.undefined_symbols() {
        let binding = bundle.manifest.bindings.iter().find(|b| &b.symbol == name);
        let target = binding
            .map(|b| b.target.clone())
            .unwrap_or(BindTarget::External { name: name.clone() });
        match target {
            BindTarget::Module { address } => {
                symbols.known.insert(
                    name.clone(),
                    Resolved::Address(module.bias.wrapping_add(address)),
                );
            }
            BindTarget::ModuleIfunc { address } => {
                symbols
                    .ifuncs
                    .push((name.clone(), module.bias.wrapping_add(address)));
            }
            BindTarget::ModuleTls { offset } => {
                if !is_main_executable(pid, module) {
                    return Err(refused(format!(
                        "patch uses thread-local `{name}` of shared library {}: not supported",
                        module.path
                    )));
                }
                let tls = module.facts.tls.as_ref().ok_or_else(|| {
                    refused(format!(
                        "patch uses thread-local `{name}` but the module has no TLS segment"
                    ))
                })?;
                let off = executable_tp_offset(tls, offset)
                    .ok_or_else(|| refused(format!("unsupported TLS layout for `{name}`")))?;
                symbols.known.insert(name.clone(), Resolved::TpOffset(off));
            }
            BindTarget::External { name: ext } => {
                let loaded = loaded.get_or_insert_with(|| search_order(pid, maps));
                let found = find_export(loaded, &ext);
                match found {
                    Some((lm, e)) if e.ifunc => symbols
                        .ifuncs
                        .push((name.clone(), lm.bias.wrapping_add(e.address))),
                    Some((lm, e)) => {
                        symbols.known.insert(
                            name.clone(),
                            Resolved::Address(lm.bias.wrapping_add(e.address)),
                        );
                    }
                    None => {} // the dry link reports it (or binds a weak reference to 0)
                }
            }
        }
    }
    Ok(symbols)
}

/// The loaded modules in the order a name is looked up: the executable, then libraries, the
/// dynamic loader last.
pub(crate) fn search_order(pid: i32, maps: &[Mapping]) -> Vec<LoadedModule> {
    let mut all = modules::loaded_modules(pid, maps);
    let exe = exe_inode(pid);
    all.sort_by_key(|m| (exe != Some(m.inode), m.path.contains("/ld-linux")));
    all
}

/// The process's definition of exported symbol `name`: the first strong one in search order,
/// else the first weak one.
fn find_export<'m>(
    loaded: &'m [LoadedModule],
    name: &str,
) -> Option<(&'m LoadedModule, modules::Export)> {
    let mut found: Option<(&LoadedModule, modules::Export)> = None;
    for lm in loaded {
        if let Some(e) = lm.facts.export(name) {
            if found.is_none_or(|(_, f)| f.weak && !e.weak) {
                found = Some((lm, e));
            }
            if !e.weak {
                break;
            }
        }
    }
    found
}

/// libgcc's registry of unwind tables in the process (`__register_frame_info` and
/// `__deregister_frame_info`, exported by libgcc_s, or linked into a static executable), if it
/// has one. C++ programs and any program that cancels threads have it; without it, nothing in
/// the process unwinds.
#[derive(Clone, Copy)]
pub(crate) struct UnwindRegistry {
    pub(crate) register: u64,
    pub(crate) deregister: u64,
}

pub(crate) fn unwind_registry(loaded: &[LoadedModule]) -> Option<UnwindRegistry> {
    let at = |name| {
        find_export(loaded, name)
            .filter(|(_, e)| !e.ifunc)
            .map(|(lm, e)| lm.bias.wrapping_add(e.address))
            .or_else(|| {
                // A static executable exports nothing; it comes first in search order.
                let exe = loaded.first()?;
                exe.facts.function(name).map(|a| exe.bias.wrapping_add(a))
            })
    };
    Some(UnwindRegistry {
        register: at("__register_frame_info")?,
        deregister: at("__deregister_frame_info")?,
    })
}

fn is_main_executable(pid: i32, module: &LoadedModule) -> bool {
    exe_inode(pid) == Some(module.inode)
}

/// The inode of the process's executable (through a live thread if its main one exited).
fn exe_inode(pid: i32) -> Option<u64> {
    let inode = |dir: i32| {
        std::fs::metadata(format!("/proc/{dir}/exe"))
            .map(|m| m.ino())
            .ok()
    };
    inode(pid).or_else(|| inode(crate::procfs::memory_dir(pid)?))
}
