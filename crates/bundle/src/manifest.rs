//! What a bundle says about itself, and the limits every field must keep.

use serde::{Deserialize, Serialize};

use crate::BundleError;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    /// Patches for one module are cumulative: level N supersedes every lower level.
    pub level: u32,
    pub module: ModuleRef,
    pub cves: Vec<String>,
    pub description: String,
    pub functions: Vec<FunctionPatch>,
    pub bindings: Vec<Binding>,
    /// Kinds of change the publisher accepted knowingly when building (`new-state`: the
    /// patch brings state the process never initialised). Absent when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accepted: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleRef {
    /// GNU build-id, lowercase hex.
    pub build_id: String,
    /// Informative file name.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionPatch {
    pub symbol: String,
    /// Link-time address in the module (runtime = load bias + address).
    pub address: u64,
    pub size: u64,
    /// SHA-256 of the `size` running bytes the engine must find.
    pub expected_sha256: String,
    /// The symbol of the patch object that takes over.
    pub replacement: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// A symbol the object uses but does not define.
    pub symbol: String,
    pub target: BindTarget,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BindTarget {
    /// Defined in the target module at this link-time address.
    Module { address: u64 },
    /// A GNU indirect function of the module: the engine calls its resolver.
    ModuleIfunc { address: u64 },
    /// A thread-local variable of the module, at this offset of its TLS template.
    ModuleTls { offset: u64 },
    /// Looked up by name in the libraries the process has loaded.
    External { name: String },
}

fn field(field: &str, reason: impl Into<String>) -> BundleError {
    BundleError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn is_symbol(s: &str) -> bool {
    !s.is_empty() && s.len() <= 1024 && !s.bytes().any(|b| b == 0 || b.is_ascii_control())
}

fn is_cve(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("CVE-") else {
        return false;
    };
    let Some((year, num)) = rest.split_once('-') else {
        return false;
    };
    year.len() == 4
        && year.bytes().all(|b| b.is_ascii_digit())
        && (4..=19).contains(&num.len())
        && num.bytes().all(|b| b.is_ascii_digit())
}

fn is_hex(s: &str, min: usize, max: usize) -> bool {
    s.len().is_multiple_of(2)
        && (min * 2..=max * 2).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Manifest {
    pub fn validate(&self) -> Result<(), BundleError> {
        if self.format != FORMAT_VERSION {
            return Err(BundleError::Manifest(format!(
                "unsupported bundle format version {}",
                self.format
            )));
        }
        if !is_id(&self.id) {
            return Err(field("id", "must be 1-64 characters of A-Z a-z 0-9 . _ -"));
        }
        if self.level == 0 {
            return Err(field("level", "must be at least 1"));
        }
        if !is_hex(&self.module.build_id, 2, 64) {
            return Err(field(
                "module.build_id",
                "must be 2-64 bytes of lowercase hex",
            ));
        }
        if self.module.name.len() > 255 || self.module.name.contains('\0') {
            return Err(field("module.name", "at most 255 bytes, no NUL"));
        }
        if self.cves.len() > 64 {
            return Err(field("cves", "at most 64"));
        }
        if let Some(bad) = self.cves.iter().find(|c| !is_cve(c)) {
            return Err(field(
                "cves",
                format!("{bad:?} is not a CVE id like CVE-2024-12345"),
            ));
        }
        if self.description.len() > 4096 {
            return Err(field("description", "at most 4096 bytes"));
        }
        if self.functions.is_empty() || self.functions.len() > 4096 {
            return Err(field("functions", "1 to 4096 entries"));
        }
        for (i, f) in self.functions.iter().enumerate() {
            if !is_symbol(&f.symbol) || !is_symbol(&f.replacement) {
                return Err(field(
                    "functions",
                    format!("entry {i} has an invalid symbol name"),
                ));
            }
            if f.size < 5 || f.size > 1 << 24 {
                return Err(field(
                    "functions",
                    format!("`{}`: size {} out of range", f.symbol, f.size),
                ));
            }
            if !is_hex(&f.expected_sha256, 32, 32) {
                return Err(field(
                    "functions",
                    format!("`{}`: expected_sha256 is not 64 hex digits", f.symbol),
                ));
            }
            if self.functions[..i]
                .iter()
                .any(|o| o.symbol == f.symbol || o.address == f.address)
            {
                return Err(field(
                    "functions",
                    format!("`{}` is listed twice", f.symbol),
                ));
            }
        }
        if self.accepted.len() > 16 || self.accepted.iter().any(|a| !is_id(a)) {
            return Err(field("accepted", "at most 16 kinds like new-state"));
        }
        if self.bindings.len() > 65536 {
            return Err(field("bindings", "at most 65536"));
        }
        let mut names: Vec<&str> = self.bindings.iter().map(|b| b.symbol.as_str()).collect();
        if let Some(bad) = names.iter().find(|n| !is_symbol(n)) {
            return Err(field("bindings", format!("invalid symbol name {bad:?}")));
        }
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(field("bindings", "a symbol is bound twice"));
        }
        for b in &self.bindings {
            if let BindTarget::External { name } = &b.target {
                if !is_symbol(name) {
                    return Err(field("bindings", format!("invalid external name {name:?}")));
                }
            }
        }
        Ok(())
    }

    /// The exact bytes that are signed.
    pub fn to_canonical(&self) -> Result<Vec<u8>, BundleError> {
        serde_json::to_vec(self).map_err(|e| BundleError::Manifest(e.to_string()))
    }
}
