//! `suture build`: a signed live patch from a source fix, the way kpatch-build and
//! upatch-build do it, or a precise reason why the fix cannot be applied live.
//!
//! 1. Three fresh copies of the source (old build outputs deleted); the fix applied to one.
//! 2. Three builds with the project's own command, each at the original path in a private
//!    mount namespace: the original as deployed (to prove the source is the deployed code and
//!    to get its symbol table, even when the deployed binary is stripped), and the original
//!    and the patched tree with `-ffunction-sections -fdata-sections -g`, through the
//!    compiler [`wrapper`] (the work trees and builds are in [`tree`]).
//! 3. The differ ([`differ`]) compares every object file of the two section-split builds;
//!    [`layout`] refuses changed struct layouts that existing data uses, and [`lines`] keeps
//!    running the functions that differ only in line numbers the fix moved. Differences in
//!    objects the fix cannot reach are build noise (dropped) or refused; new state the
//!    changed code depends on is refused unless accepted. Every refusal is a typed
//!    [`Refusal`] with a stable reason code.
//! 4. The emitter ([`emit`](mod@emit)) writes one relocatable with what changed, and the unwind records
//!    of exactly that code ([`eh_frame`]); the manifest binds the rest to the deployed module
//!    by address and lists the functions to detour with the deployed bytes they must find.

pub mod differ;
pub mod eh_frame;
pub mod emit;
pub mod layout;
pub mod lines;
pub mod refusal;
pub mod tree;
pub mod wrapper;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use suture_bundle::{FunctionPatch, Manifest, ModuleRef, FORMAT_VERSION};
use suture_detour::check_site;
use suture_module::Module;

use differ::{compare, include, ModuleSymbols, Obj, UnitBinding};
use emit::{emit, Unit};
use refusal::refuse;
pub use refusal::{refusal_of, Refusal, RefusalKind};

/// `-g` gives the differ the struct layouts to check; it does not change the code gcc emits.
/// `-mno-direct-extern-access` (gcc 12+, where accepted) makes executables reach external data
/// through the GOT, so a fix may use data (`stderr`) the program never used: the patch's GOT
/// reaches the library's copy at any distance, where a direct reference could not.
const SPLIT_FLAGS: &str = "-ffunction-sections -fdata-sections -g ?-mno-direct-extern-access";

/// What the operator asked for.
pub struct SourceFix<'a> {
    pub source: &'a Path,
    /// The fix as unified diffs, applied in order: a series (fix 1, fix 2, …) gives the
    /// cumulative patch against the deployed binary.
    pub diffs: &'a [PathBuf],
    /// The deployed executable or library (may be stripped).
    pub target: &'a Path,
    pub build_cmd: &'a str,
    /// Where the target appears in the tree after the build, relative to the tree.
    pub artifact: Option<&'a Path>,
    /// Work folder (kept afterwards when the operator asked for it).
    pub work: &'a Path,
    pub id: Option<String>,
    /// Kinds of change the operator accepts knowingly (`new-state`).
    pub accept: Vec<String>,
    pub level: u32,
    pub cves: Vec<String>,
    pub description: String,
}

/// What the build found, for the operator.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    /// Functions whose code changed and that the diff names.
    pub changed: Vec<String>,
    /// Functions whose code changed although the diff does not name them: they inline (or
    /// were specialised from) a changed function.
    pub pulled_in: Vec<String>,
    /// Functions the fix did not touch whose code differs only in line numbers it moved
    /// (`__LINE__`): kept as they run.
    pub line_numbers_only: Vec<String>,
    pub new_functions: Vec<String>,
    pub new_data: Vec<String>,
    pub changed_rodata: Vec<String>,
    /// Functions and data that differ from one build of the same source to the next
    /// (timestamps, random ids) in files the fix cannot reach: left as they run.
    pub noise: Vec<String>,
    /// State the patch brings that the running process never initialised (accepted with
    /// `--accept new-state`).
    pub new_state: Vec<String>,
    /// Changes a reviewer should look at (added or removed calls to `free`).
    pub warnings: Vec<String>,
    pub objects_compared: usize,
    pub build_seconds: f64,
}

pub struct Built {
    pub manifest: Manifest,
    pub object: Vec<u8>,
    pub summary: Summary,
}

pub fn build_from_source(fix: &SourceFix, progress: &mut dyn FnMut(&str)) -> Result<Built> {
    let started = Instant::now();
    let source = fix
        .source
        .canonicalize()
        .with_context(|| format!("source folder {}", fix.source.display()))?;
    let deployed = std::fs::read(fix.target)
        .with_context(|| format!("cannot read {}", fix.target.display()))?;
    let deployed_module =
        Module::parse(&deployed).context("the target is not a usable ELF module")?;
    let build_id = deployed_module.build_id_hex().ok_or_else(|| {
        anyhow!("the target has no GNU build-id; suture identifies modules by build-id")
    })?;
    let target_name = fix
        .target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();

    std::fs::create_dir_all(fix.work)?;
    let work = fix.work.canonicalize()?;
    let tools = work.join("tools");
    let trees = ["plain", "orig", "patched"].map(|n| work.join(n));
    for t in &trees {
        progress(&format!("copying the source to {}", t.display()));
        tree::copy_clean(&source, t)?;
    }
    if fix.diffs.is_empty() {
        bail!("no diff given");
    }
    if let Some(k) = fix.accept.iter().find(|k| *k != "new-state") {
        bail!("--accept {k}: only new-state can be accepted");
    }
    for diff in fix.diffs {
        tree::apply_diff(&trees[2], diff)?;
    }

    let mut records = Vec::new();
    for (t, flags, what) in [
        (&trees[0], "", "the original as deployed"),
        (
            &trees[1],
            SPLIT_FLAGS,
            "the original, one section per function",
        ),
        (
            &trees[2],
            SPLIT_FLAGS,
            "the patched tree, one section per function",
        ),
    ] {
        progress(&format!("building {what}"));
        let log = work.join(format!(
            "build-{}.log",
            t.file_name().and_then(|n| n.to_str()).unwrap_or("x")
        ));
        let b = tree::Build {
            source: &source,
            tree: t,
            command: fix.build_cmd,
            flags,
            tools: &tools,
        };
        records.push(b.run(&log)?);
    }
    if records[1].compiled.is_empty() {
        bail!("the build compiled nothing through the compiler wrapper: does it hard-code a compiler path, or build into a folder outside the source tree (whose outputs it then reuses)?");
    }

    // Prove the rebuilt original is the deployed code.
    let plain_artifact = find_artifact(&trees[0], fix.artifact, &target_name, &deployed_module)?;
    let plain = std::fs::read(&plain_artifact)?;
    let plain_module = Module::parse(&plain)?;
    same_code(&deployed_module, &plain_module)?;
    let module_symbols = ModuleSymbols::read(&plain)?;
    if !plain_module.has_symtab() {
        bail!(
            "the rebuilt {} has no symbol table (does the build strip it?)",
            plain_artifact.display()
        );
    }

    // Diff object by object.
    progress("comparing objects");
    let mut summary = Summary::default();
    // The objects that make up the target in each section-split build, paired by source.
    let artifact_rel = plain_artifact
        .strip_prefix(&trees[0])
        .unwrap_or(&plain_artifact)
        .to_path_buf();
    let objects_of = |i: usize| -> Result<BTreeMap<PathBuf, PathBuf>> {
        let rec = &records[i];
        let list = rec
            .objects_of(&trees[i].join(&artifact_rel))
            .unwrap_or_else(|| rec.all_objects());
        let mut by_source = BTreeMap::new();
        for (src, obj) in list {
            let rel = src.strip_prefix(&trees[i]).unwrap_or(&src).to_path_buf();
            if by_source.insert(rel.clone(), obj).is_some() {
                bail!(
                    "{} is compiled more than once into the target; cannot tell the objects apart",
                    rel.display()
                );
            }
        }
        Ok(by_source)
    };
    let (orig_objects, patched_objects) = (objects_of(1)?, objects_of(2)?);
    let mut pairs = Vec::new();
    // A source file the fix adds is compared with an empty object: everything in it is new.
    let mut new_files = Vec::new();
    for (rel, obj) in &patched_objects {
        let orig = match orig_objects.get(rel) {
            Some(orig) => std::fs::read(orig)?,
            None => {
                progress(&format!("{} is a new source file", rel.display()));
                new_files.push(rel.clone());
                differ::empty_object()?
            }
        };
        pairs.push((orig, std::fs::read(obj)?, rel.clone()));
    }
    summary.objects_compared = pairs.len();
    let parsed: Vec<(Obj, Obj, PathBuf)> = pairs
        .iter()
        .filter(|(o, p, _)| o != p)
        .map(|(o, p, rel)| {
            let orig = Obj::parse(o)?;
            let mut patched = Obj::parse(p)?;
            patched.adopt_keys_from(&orig);
            Ok((orig, patched, rel.clone()))
        })
        .collect::<Result<_>>()?;
    let line_map = lines::Series::new(
        fix.diffs
            .iter()
            .map(|d| {
                let text =
                    std::fs::read(d).with_context(|| format!("cannot read {}", d.display()))?;
                Ok(lines::LineMap::parse(&String::from_utf8_lossy(&text)))
            })
            .collect::<Result<_>>()?,
    );
    // A source file as it is in the original and in the patched tree.
    let sources_of = |rel: &Path| {
        (
            std::fs::read_to_string(trees[1].join(rel)).ok(),
            std::fs::read_to_string(trees[2].join(rel)).ok(),
        )
    };
    // The plain build's objects: a second build of the original, to tell build noise from
    // changes.
    let plain_objects = objects_of(0).unwrap_or_default();
    let only_sources = line_map.only_sources();
    let mut found = Vec::new();
    for (o, p, rel) in &parsed {
        // When the diff touches only C/C++ source files, an object built from another file
        // that includes none of them cannot change because of the fix.
        let untraceable = only_sources
            && !new_files.contains(rel)
            && !line_map.touches(rel)
            && !includes_touched(o, p, &line_map)?;
        let mut noise = std::collections::BTreeSet::new();
        if untraceable {
            if let Some(plain_obj) = plain_objects.get(rel) {
                let bytes = std::fs::read(plain_obj)?;
                let plain = Obj::parse(&bytes)?;
                for (key, e) in &o.entities {
                    if plain
                        .entities
                        .get(key)
                        .is_some_and(|pe| !pe.same_code_as(e))
                    {
                        noise.insert(key.clone());
                    }
                }
            }
            for key in &noise {
                if let Some(e) = p.entities.get(key) {
                    summary
                        .noise
                        .push(format!("{} ({})", e.name, p.source_name));
                }
            }
        }
        let mut changes = in_file(compare(o, p, &noise), rel)?;
        if untraceable && !changes.is_empty() {
            let names: Vec<String> = changes
                .changed
                .iter()
                .chain(&changes.new_functions)
                .chain(&changes.new_data)
                .chain(&changes.changed_rodata)
                .map(|k| {
                    format!(
                        "`{}`",
                        p.entities.get(k).map_or(k.as_str(), |e| e.name.as_str())
                    )
                })
                .collect();
            return Err(refuse(
                RefusalKind::Untraceable,
                format!(
                    "{} of {} changed although the fix touches neither that file nor anything it includes, and a second build of the original does not reproduce the difference: make the build reproducible (generated files, embedded build ids), see --keep-work",
                    names.join(", "),
                    rel.display()
                ),
            ));
        }
        if !new_files.contains(rel) {
            in_file(layout::check(&o.file, &p.file), rel)?;
        }
        let sources = sources_of(rel);
        for key in keep_line_number_only(o, p, &mut changes, &sources, &|a, b| {
            line_map.moved(rel, a, b)
        }) {
            summary
                .line_numbers_only
                .push(format!("{key} ({})", p.source_name));
        }
        if changes.is_empty() {
            continue;
        }
        let inclusion = include(p, &changes)?;
        found.push((o, p, rel, changes, inclusion, sources));
    }
    if found.is_empty() {
        return Err(refuse(
            RefusalKind::NoCodeChange,
            format!("the fix changes no code of {target_name} (no bundle written)"),
        ));
    }
    // New state the changed code depends on, and changed freeing.
    let (mut new_state, warnings) = state_changes(&found);
    summary.warnings = warnings;
    let bindings: Vec<UnitBinding> = found
        .iter()
        .map(|(o, p, rel, ..)| UnitBinding {
            module: &module_symbols,
            orig: o,
            patched: p,
            placement: module_symbols.place(o, &plain_module),
            label: rel.display().to_string(),
        })
        .collect();
    let units: Vec<Unit> = found
        .iter()
        .zip(&bindings)
        .map(|((_, p, _, changes, inclusion, _), binding)| Unit {
            obj: p,
            changes,
            inclusion,
            binding,
        })
        .collect();
    let emitted = emit(&units)?;
    new_state.extend(emitted.carried_writable.iter().cloned());
    new_state.sort();
    new_state.dedup();
    let mut accepted = Vec::new();
    if !new_state.is_empty() {
        if !fix.accept.iter().any(|a| a == "new-state") {
            return Err(refuse(
                RefusalKind::NewState,
                format!(
                    "the fix brings state the running process never initialised: {}; it would start at its initial value when the patch is applied, not at program start (review, then build with --accept new-state)",
                    new_state.join(", ")
                ),
            ));
        }
        accepted.push("new-state".to_string());
    }
    summary.new_state = new_state;

    // The functions to detour: changed ones that exist in the deployed module, once per
    // address (aliases are one function).
    let mut functions: Vec<FunctionPatch> = Vec::new();
    for (ui, ((_, p, _, changes, _, sources), binding)) in found.iter().zip(&bindings).enumerate() {
        for key in &changes.changed {
            let Some(entity) = p.entities.get(key) else {
                continue;
            };
            let Some(def) = binding.by_key(key)? else {
                continue; // fully inlined in the deployed build: its callers are included instead
            };
            if functions.iter().any(|f| f.address == def.address) {
                continue;
            }
            let code = deployed_module
                .bytes_at(def.address, def.size)
                .ok_or_else(|| anyhow!("`{}`: no code in the deployed file", entity.name))?;
            check_site(def.address, code).map_err(|e| {
                let kind = match e {
                    suture_detour::SiteError::TooShort { .. } => RefusalKind::TooShort,
                    _ => RefusalKind::DetourSite,
                };
                refuse(kind, format!("`{}`: {e}", entity.name))
            })?;
            let replacement = emitted
                .replacements
                .get(&(ui, key.clone()))
                .cloned()
                .ok_or_else(|| anyhow!("`{}` missing from the patch object", entity.name))?;
            // Two files may each have a static function of one name: the manifest names
            // the second with its file.
            let symbol = if functions.iter().any(|f| f.symbol == entity.name) {
                format!("{}@{}", entity.name, binding.label)
            } else {
                entity.name.clone()
            };
            functions.push(FunctionPatch {
                symbol,
                address: def.address,
                size: def.size,
                expected_sha256: hex::encode(Sha256::digest(code)),
                replacement,
            });
            let line = format!("{} ({})", entity.name, p.source_name);
            if !own_text_unchanged(sources, &entity.name) {
                summary.changed.push(line);
            } else {
                summary.pulled_in.push(line);
            }
        }
        summary.new_functions.extend(
            changes
                .new_functions
                .iter()
                .map(|k| format!("{k} ({})", p.source_name)),
        );
        summary.new_data.extend(
            changes
                .new_data
                .iter()
                .map(|k| format!("{k} ({})", p.source_name)),
        );
        summary.changed_rodata.extend(
            changes
                .changed_rodata
                .iter()
                .map(|k| format!("{k} ({})", p.source_name)),
        );
    }
    if functions.is_empty() {
        return Err(refuse(
            RefusalKind::NoCodeChange,
            format!("the fix changes no function of {target_name} that can be detoured (no bundle written)"),
        ));
    }
    functions.sort_by_key(|f| f.address);
    summary.build_seconds = started.elapsed().as_secs_f64();
    let object_hash = hex::encode(Sha256::digest(&emitted.object));
    let manifest = Manifest {
        format: FORMAT_VERSION,
        id: fix.id.clone().unwrap_or_else(|| {
            let clean: String = target_name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "._-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .take(40)
                .collect();
            format!("{clean}-L{}-{}", fix.level, &object_hash[..8])
        }),
        level: fix.level,
        module: ModuleRef {
            build_id,
            name: target_name,
        },
        cves: fix.cves.clone(),
        description: fix.description.clone(),
        functions,
        bindings: emitted.bindings,
        accepted,
    };
    Ok(Built {
        manifest,
        object: emitted.object,
        summary,
    })
}

/// Run-time initialisation a changed function may start to depend on.
const RUNTIME_INIT: &[&str] = &["pthread_once", "call_once", "__cxa_guard_acquire"];

/// What the changed code newly depends on that the running process never set up: new
/// writable data it reaches (through new functions too, across files), new run-time
/// initialisation (`pthread_once`); and, as warnings, changed functions that call `free` a
/// different number of times.
#[allow(clippy::type_complexity)]
fn state_changes(
    found: &[(
        &Obj,
        &Obj,
        &PathBuf,
        differ::Changes,
        differ::Inclusion,
        (Option<String>, Option<String>),
    )],
) -> (Vec<String>, Vec<String>) {
    let (mut state, mut warnings) = (Vec::new(), Vec::new());
    // What the changed functions reach, as (unit, key); a name another unit defines
    // globally leads there.
    let mut seen: std::collections::BTreeSet<(usize, String)> = Default::default();
    let mut stack: Vec<(usize, String)> = found
        .iter()
        .enumerate()
        .flat_map(|(u, f)| f.3.changed.iter().map(move |k| (u, k.clone())))
        .collect();
    while let Some((u, key)) = stack.pop() {
        if !seen.insert((u, key.clone())) {
            continue;
        }
        let Some(e) = found[u].1.entities.get(&key) else {
            continue;
        };
        for t in e.symbol_targets() {
            if found[u].1.entities.contains_key(t) {
                stack.push((u, t.to_string()));
            } else {
                for (v, f) in found.iter().enumerate() {
                    if f.1.entities.get(t).is_some_and(|d| !d.local) {
                        stack.push((v, t.to_string()));
                    }
                }
            }
        }
    }
    for (u, (o, p, _, changes, _, _)) in found.iter().enumerate() {
        for key in &changes.new_data {
            if let Some(e) = p.entities.get(key) {
                if e.writable && !e.relro && seen.contains(&(u, key.clone())) {
                    state.push(format!("{} ({})", e.name, p.source_name));
                }
            }
        }
        for key in &changes.changed {
            let (Some(before), Some(after)) = (o.entities.get(key), p.entities.get(key)) else {
                continue;
            };
            for init in RUNTIME_INIT {
                if after.references_to(init) > 0 && before.references_to(init) == 0 {
                    state.push(format!(
                        "{} ({}) now initialises at run time ({init})",
                        after.name, p.source_name
                    ));
                }
            }
            let (was, is) = (before.references_to("free"), after.references_to("free"));
            if was != is {
                warnings.push(format!(
                    "{} ({}) calls free {is} times where it called it {was} times: check that objects already live are freed once",
                    after.name, p.source_name
                ));
            }
        }
    }
    (state, warnings)
}

/// Whether the debug info of either object names a file the diff touches (a header with
/// declarations or code, a `.c` file included by another).
fn includes_touched(o: &Obj, p: &Obj, line_map: &lines::Series) -> Result<bool> {
    for obj in [o, p] {
        if layout::source_files(&obj.file)?
            .iter()
            .any(|f| line_map.touches_path(f))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Names the file an error is about: a refusal keeps its one-line form `cannot be
/// live-patched (reason): … in FILE`, other errors get it as context.
fn in_file<T>(r: Result<T>, rel: &Path) -> Result<T> {
    r.map_err(|e| match refusal_of(&e) {
        Some(r) => anyhow::Error::new(Refusal::new(
            r.reason,
            format!("{} (in {})", r.message, rel.display()),
        )),
        None => e.context(format!("in {}", rel.display())),
    })
}

/// Takes out of `changes` the functions the fix did not touch whose code differs only in line
/// numbers the diff moved (all parts of a function, `.cold` and clones included, or none), and
/// returns them.
fn keep_line_number_only(
    orig: &Obj,
    patched: &Obj,
    changes: &mut differ::Changes,
    sources: &(Option<String>, Option<String>),
    line_moved: &dyn Fn(u64, u64) -> bool,
) -> Vec<String> {
    let base = |k: &str| k.split('.').next().unwrap_or(k).to_string();
    let line_only = |key: &String| {
        let (Some(o), Some(p)) = (orig.entities.get(key), patched.entities.get(key)) else {
            return false;
        };
        own_text_unchanged(sources, &p.name) && o.differs_only_in_immediates(p, line_moved)
    };
    let mut groups: BTreeMap<String, bool> = BTreeMap::new();
    for key in &changes.changed {
        let ok = line_only(key);
        groups
            .entry(base(key))
            .and_modify(|all| *all &= ok)
            .or_insert(ok);
    }
    let (kept, changed): (Vec<String>, Vec<String>) = std::mem::take(&mut changes.changed)
        .into_iter()
        .partition(|k| groups.get(&base(k)).copied().unwrap_or(false));
    changes.changed = changed;
    kept
}

/// Is the function's own source text the same in the original and the patched tree? Then
/// its code changed only because of what it inlines. Unknown (not found) counts as changed.
fn own_text_unchanged(sources: &(Option<String>, Option<String>), symbol: &str) -> bool {
    let base = symbol.split('.').next().unwrap_or(symbol);
    let name = match base.strip_prefix("_Z") {
        Some(mangled) => last_mangled_identifier(mangled).unwrap_or(base),
        None => base,
    };
    match sources {
        (Some(o), Some(p)) => match (definition(o, name), definition(p, name)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        },
        _ => false,
    }
}

/// The text of the definition of function `name` in C/C++ source: from the name to the
/// brace that closes its body. Comments and literals are ignored; after the parameter list
/// comes `{` (ANSI), or K&R parameter declarations and then `{`.
fn definition(src: &str, name: &str) -> Option<String> {
    let code = blank_comments_and_literals(src);
    let b = code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    for (i, _) in code.match_indices(name) {
        if i > 0 && ident(b[i - 1]) {
            continue;
        }
        let mut k = i + name.len();
        while k < b.len() && b[k].is_ascii_whitespace() {
            k += 1;
        }
        if b.get(k) != Some(&b'(') {
            continue;
        }
        let close = matching(b, k, b'(', b')')?;
        let mut open = close + 1;
        while open < b.len() && b[open] != b'{' {
            // K&R declarations hold no parentheses or assignments; a call or prototype does.
            if matches!(b[open], b'(' | b')' | b'=' | b'}')
                || (b[open] == b';' && !knr_decls(&code[close + 1..open]))
            {
                break;
            }
            open += 1;
        }
        if b.get(open) != Some(&b'{') {
            continue;
        }
        let end = matching(b, open, b'{', b'}')?;
        return Some(src[i..=end].to_string());
    }
    None
}

/// Text between `)` and `{` of a K&R definition: declarations like `int a; char *b;`.
fn knr_decls(text: &str) -> bool {
    let t = text.trim();
    !t.is_empty()
        && t.bytes()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
}

fn matching(b: &[u8], open_at: usize, open: u8, close: u8) -> Option<usize> {
    let mut depth = 0usize;
    for (k, &c) in b.iter().enumerate().skip(open_at) {
        if c == open {
            depth += 1;
        } else if c == close {
            depth = depth.checked_sub(1)?;
            if depth == 0 {
                return Some(k);
            }
        }
    }
    None
}

/// The source with comments, string and character literals replaced by spaces (same offsets).
fn blank_comments_and_literals(src: &str) -> String {
    let mut out: Vec<u8> = src.as_bytes().to_vec();
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let blank_to = |out: &mut Vec<u8>, from: usize, to: usize| {
            for c in out.iter_mut().take(to.min(b.len())).skip(from) {
                if *c != b'\n' {
                    *c = b' ';
                }
            }
        };
        if b[i..].starts_with(b"/*") {
            let end = src[i + 2..]
                .find("*/")
                .map(|e| i + 2 + e + 2)
                .unwrap_or(b.len());
            blank_to(&mut out, i, end);
            i = end;
        } else if b[i..].starts_with(b"//") {
            let end = src[i..].find('\n').map(|e| i + e).unwrap_or(b.len());
            blank_to(&mut out, i, end);
            i = end;
        } else if b[i] == b'"' || b[i] == b'\'' {
            let q = b[i];
            let mut k = i + 1;
            while k < b.len() && b[k] != q {
                k += if b[k] == b'\\' { 2 } else { 1 };
            }
            blank_to(&mut out, i + 1, k);
            i = k + 1;
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The function's own name in an Itanium-mangled name (after `_Z`): the last identifier of a
/// nested name (`N5Meter3addE…` → `add`), else the first one (`5shoutRK…` → `shout`).
fn last_mangled_identifier(m: &str) -> Option<&str> {
    let b = m.as_bytes();
    let nested = b.first() == Some(&b'N');
    let mut i = usize::from(nested);
    while i < b.len() && matches!(b[i], b'r' | b'V' | b'K') {
        i += 1;
    }
    let mut last = None;
    while i < b.len() && b[i].is_ascii_digit() {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let n: usize = m[start..i].parse().ok()?;
        let id = m.get(i..i + n)?;
        last = Some(id);
        i += n;
        if !nested {
            break;
        }
    }
    last
}

/// The rebuilt target: named by the operator, else found by file name in the tree.
fn find_artifact(
    tree: &Path,
    given: Option<&Path>,
    name: &str,
    deployed: &Module,
) -> Result<PathBuf> {
    if let Some(rel) = given {
        let p = tree.join(rel);
        if !p.is_file() {
            bail!("--artifact {}: not produced by the build", rel.display());
        }
        return Ok(p);
    }
    let mut found = Vec::new();
    find_named(tree, name, &mut found)?;
    // Prefer an exact build-id match (a bit-for-bit reproducible build).
    let want = deployed.build_id();
    if let Some(p) = found.iter().find(|p| {
        std::fs::read(p)
            .ok()
            .and_then(|d| suture_module::read_build_id(&d).ok().flatten())
            .as_deref()
            == want
    }) {
        return Ok(p.clone());
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("the build produced no file named {name}; give its place with --artifact"),
        _ => bail!("the build produced several files named {name}; choose one with --artifact"),
    }
}

fn find_named(dir: &Path, name: &str, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            find_named(&p, name, out)?;
        } else if e.file_name().to_str() == Some(name) {
            out.push(p);
        }
    }
    Ok(())
}

/// The deployed and the rebuilt module must carry the same code (debug info may differ).
fn same_code(deployed: &Module, rebuilt: &Module) -> Result<()> {
    if deployed.build_id().is_some() && deployed.build_id() == rebuilt.build_id() {
        return Ok(());
    }
    let exec = |m: &Module| -> Vec<(u64, u64)> {
        m.load_segments()
            .iter()
            .filter(|s| s.executable)
            .map(|s| (s.vaddr, s.filesz))
            .collect()
    };
    let (a, b) = (exec(deployed), exec(rebuilt));
    if a != b {
        bail!("the rebuilt original's code is laid out differently from the deployed binary: the source or toolchain differs from what built it");
    }
    for (vaddr, size) in a {
        let (x, y) = (
            deployed.bytes_at(vaddr, size),
            rebuilt.bytes_at(vaddr, size),
        );
        if x != y {
            let at = x
                .zip(y)
                .and_then(|(x, y)| x.iter().zip(y).position(|(p, q)| p != q))
                .unwrap_or(0);
            bail!(
                "the rebuilt original's code differs from the deployed binary at {:#x}: the source or toolchain differs from what built it",
                vaddr + at as u64
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ansi_and_knr_definitions_not_mentions() {
        let src = "/* inflate() uses a state machine { */\nint inflate(z_streamp strm, int flush);\nint other(void) { return inflate(0, 1); }\nint ZEXPORT inflate(strm, flush)\nz_streamp strm;\nint flush;\n{\n    if (x) { y(\"}\"); }\n    return 0;\n}\n";
        let d = definition(src, "inflate").expect("found");
        assert!(d.starts_with("inflate(strm, flush)"), "{d}");
        assert!(d.ends_with("return 0;\n}"), "{d}");
        let ansi = "static int clamp(int n) { return n > 8 ? 8 : n; }\n";
        assert_eq!(
            definition(ansi, "clamp").as_deref(),
            Some("clamp(int n) { return n > 8 ? 8 : n; }")
        );
        assert_eq!(definition("int f(int);\n", "f"), None);
        let cpp = "int Meter::add(const char *s) { total += 1; return total; }";
        assert!(definition(cpp, "add").is_some());
    }

    #[test]
    fn mangled_names_give_their_function() {
        assert_eq!(last_mangled_identifier("N5Meter3addEPKc"), Some("add"));
        assert_eq!(
            last_mangled_identifier("5shoutRKNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEE"),
            Some("shout")
        );
    }
}
