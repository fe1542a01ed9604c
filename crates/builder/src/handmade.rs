//! A bundle from a hand-compiled replacement object: `suture bundle --target BIN --object NEW.o
//! --replace FUNC[=NEWFUNC]`.
//!
//! Everything the engine will check in the running process is first checked here against the
//! deployed binary, so a bad bundle is refused at the desk, not on the host: the function exists
//! exactly once, is long enough for a detour and has no branch into its entry, its replacement is
//! defined by the object, and every symbol the object needs binds to exactly one definition.

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use suture_bundle::{BindTarget, Binding, FunctionPatch, Manifest, ModuleRef, FORMAT_VERSION};
use suture_detour::check_site;
use suture_link::Plan;
use suture_module::{Lookup, Module, SymbolKind};

/// `FUNC[=NEWFUNC]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replace {
    pub function: String,
    pub replacement: String,
}

impl std::str::FromStr for Replace {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (f, r) = s.split_once('=').unwrap_or((s, s));
        if f.is_empty() || r.is_empty() {
            return Err(format!("expected FUNC or FUNC=NEWFUNC, got {s:?}"));
        }
        Ok(Replace {
            function: f.to_string(),
            replacement: r.to_string(),
        })
    }
}

/// What the operator gave us.
pub struct Handmade<'a> {
    /// The deployed executable or shared library.
    pub target: &'a [u8],
    /// Its file name (informative, shown by `inspect` and `status`).
    pub target_name: String,
    pub object: &'a [u8],
    pub replaces: Vec<Replace>,
    pub id: Option<String>,
    pub level: u32,
    pub cves: Vec<String>,
    pub description: String,
}

pub fn handmade_manifest(h: &Handmade) -> Result<Manifest> {
    let module = Module::parse(h.target).context("target is not a usable ELF module")?;
    let build_id = module.build_id_hex().ok_or_else(|| {
        anyhow!("target has no GNU build-id (suture identifies modules by build-id: link with -Wl,--build-id)")
    })?;
    let plan = Plan::new(h.object).map_err(|e| anyhow!("replacement object: {e}"))?;
    let defined = plan.defined_symbols();
    if h.replaces.is_empty() {
        bail!("nothing to replace: give at least one --replace FUNC[=NEWFUNC]");
    }

    let mut functions = Vec::new();
    for r in &h.replaces {
        let sym = match module.lookup(&r.function) {
            Lookup::Unique(s) => s,
            Lookup::Ambiguous(all) => bail!(
                "`{}` is defined {} times in {} (at {}): cannot tell which one to replace",
                r.function,
                all.len(),
                h.target_name,
                all.iter()
                    .map(|s| format!("{:#x}", s.address))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Lookup::NotFound => bail!(
                "`{}` is not defined in {}{}",
                r.function,
                h.target_name,
                if module.has_symtab() {
                    ""
                } else {
                    " (it is stripped: only exported functions can be named)"
                }
            ),
        };
        if !matches!(sym.kind, SymbolKind::Function) {
            bail!("`{}` in {} is not a function", r.function, h.target_name);
        }
        if sym.size == 0 {
            bail!(
                "`{}` has no size in the symbol table; cannot verify its code",
                r.function
            );
        }
        let code = module
            .bytes_at(sym.address, sym.size)
            .ok_or_else(|| anyhow!("`{}`: its code is not in the file", r.function))?;
        check_site(sym.address, code)
            .map_err(|e| anyhow!("`{}` cannot be detoured: {e}", r.function))?;
        if !defined.iter().any(|d| d == &r.replacement) {
            bail!("replacement object does not define `{}`", r.replacement);
        }
        functions.push(FunctionPatch {
            symbol: r.function.clone(),
            address: sym.address,
            size: sym.size,
            expected_sha256: hex::encode(Sha256::digest(code)),
            replacement: r.replacement.clone(),
        });
    }

    let mut bindings = Vec::new();
    for name in plan.undefined_symbols() {
        let target = match module.lookup(name) {
            Lookup::Unique(s) => match s.kind {
                SymbolKind::Ifunc => BindTarget::ModuleIfunc { address: s.address },
                SymbolKind::Tls => BindTarget::ModuleTls { offset: s.address },
                _ => BindTarget::Module { address: s.address },
            },
            Lookup::Ambiguous(all) => bail!(
                "the object refers to `{name}`, which is defined {} times in {} (at {}): cannot tell which one it means",
                all.len(),
                h.target_name,
                all.iter().map(|s| format!("{:#x}", s.address)).collect::<Vec<_>>().join(", ")
            ),
            Lookup::NotFound => BindTarget::External { name: name.clone() },
        };
        bindings.push(Binding {
            symbol: name.clone(),
            target,
        });
    }

    let id = match &h.id {
        Some(id) => id.clone(),
        None => default_id(&h.target_name, h.level, h.object),
    };
    Ok(Manifest {
        format: FORMAT_VERSION,
        id,
        level: h.level,
        module: ModuleRef {
            build_id,
            name: h.target_name.clone(),
        },
        cves: h.cves.clone(),
        description: h.description.clone(),
        functions,
        bindings,
        accepted: Vec::new(),
    })
}

/// `<module>-L<level>-<8 hex of the object's hash>`, restricted to the id alphabet.
fn default_id(name: &str, level: u32, object: &[u8]) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let hash = hex::encode(Sha256::digest(object));
    format!("{clean}-L{level}-{}", &hash[..8])
}
