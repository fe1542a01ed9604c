//! Work trees: fresh copies of the source, the fix applied to one, and the project's own build
//! command run in them.
//!
//! Each build runs in a private mount namespace with its work tree bind-mounted over the
//! original source folder, so paths compiled into the code (`__FILE__`, debug info) are the
//! ones the deployed binary was built with, and the original folder is never written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::wrapper;

/// Copies `source` to `dest` and deletes every ELF file, archive, libtool output and configured
/// CMake or Meson build folder in the copy: old build outputs must never stand in for a fresh
/// build, and a configured build folder pins the compiler path, which would bypass the wrapper.
pub fn copy_clean(source: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        std::fs::remove_dir_all(dest)
            .with_context(|| format!("cannot clear {}", dest.display()))?;
    }
    std::fs::create_dir_all(dest)?;
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", source.display()))
        .arg(dest)
        .status()
        .context("cannot run cp")?;
    if !st.success() {
        bail!("cannot copy {} to {}", source.display(), dest.display());
    }
    purge_outputs(dest)?;
    remove_dangling_links(dest)
}

/// Symbolic links left dangling by the purge (libfoo.so -> libfoo.so.1.2): a build would take
/// them for outputs that exist.
fn remove_dangling_links(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        let path = entry.path();
        if ty.is_dir() {
            remove_dangling_links(&path)?;
        } else if ty.is_symlink() && !path.exists() {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Deletes build outputs under `dir`: ELF files, archives, libtool outputs, configured build
/// folders.
fn purge_outputs(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        let path = entry.path();
        if ty.is_dir() {
            let configured = ["CMakeCache.txt", "meson-private"]
                .iter()
                .any(|marker| path.join(marker).exists());
            if configured {
                tracing::info!(dir = %path.display(), "removing a configured build folder");
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            } else if entry.file_name() == ".libs" || entry.file_name() == "_libs" {
                // libtool's real outputs; its .lo/.la stamps go below.
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            } else {
                purge_outputs(&path)?;
            }
        } else if ty.is_file() {
            let mut head = [0u8; 4];
            let is_elf = std::fs::File::open(&path)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
                .is_ok()
                && &head == b"\x7fELF";
            // Archives, and libtool's stamps for objects and libraries (text files that would
            // tell make the deleted outputs are up to date).
            let is_output = path
                .extension()
                .is_some_and(|e| e == "a" || e == "lo" || e == "la" || e == "lai");
            if is_elf || is_output {
                std::fs::remove_file(&path)?;
            }
        }
    }
    Ok(())
}

/// Applies a unified diff (`-p1` as git and distro patches are, else `-p0`).
pub fn apply_diff(tree: &Path, diff: &Path) -> Result<()> {
    // patch runs inside the tree: a relative path would be looked up there.
    let diff = &std::fs::canonicalize(diff)
        .with_context(|| format!("cannot read the fix {}", diff.display()))?;
    let mut why = String::new();
    for level in ["-p1", "-p0"] {
        let dry = Command::new("patch")
            .args([level, "--dry-run", "--batch", "--forward", "-s", "-i"])
            .arg(diff)
            .current_dir(tree)
            .output()
            .context("cannot run patch (apt-get install patch)")?;
        if dry.status.success() {
            let out = Command::new("patch")
                .args([
                    level,
                    "--batch",
                    "--forward",
                    "-s",
                    "--no-backup-if-mismatch",
                    "-i",
                ])
                .arg(diff)
                .current_dir(tree)
                .output()?;
            if out.status.success() {
                return Ok(());
            }
        }
        if why.is_empty() {
            // What patch said at -p1, the usual level, in one line.
            why = String::from_utf8_lossy(&dry.stdout)
                .lines()
                .chain(String::from_utf8_lossy(&dry.stderr).lines())
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .take(2)
                .collect::<Vec<_>>()
                .join("; ");
        }
    }
    bail!(
        "{} does not apply to the source tree (at -p1 and -p0): {why}",
        diff.display()
    )
}

/// The fixed time every build sees (`SOURCE_DATE_EPOCH`, which gcc uses for `__DATE__` and
/// `__TIME__`, and the `date` shim for generated files): the operator's own value if set,
/// else 2024-01-01. Build-time noise then cannot differ between the builds Suture compares.
fn source_date_epoch() -> String {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or_else(|| "1704067200".to_string())
}

/// Tools put before the real ones on the builds' `PATH`:
/// - `strip` (and `install -s`, which runs it) does nothing, but still writes `-o OUT`: the
///   builds Suture compares keep their symbols;
/// - `date` without an explicit date answers `SOURCE_DATE_EPOCH`, so a generated header with
///   the build time (`date +%s` in redis's mkreleasehdr.sh) is the same in every build.
fn write_shims(bin: &Path, real_path: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let strip = "#!/bin/sh\n# suture: the builds suture compares keep their symbols.\nout= prev= last=\nfor a in \"$@\"; do\n  [ \"$prev\" = -o ] && out=$a\n  case \"$a\" in -o?*) out=${a#-o} ;; esac\n  prev=$a last=$a\ndone\n[ -n \"$out\" ] && [ \"$out\" != \"$last\" ] && cp -f \"$last\" \"$out\"\nexit 0\n";
    let mut shims = vec![
        ("strip".to_string(), strip.to_string()),
        ("x86_64-linux-gnu-strip".to_string(), strip.to_string()),
    ];
    if let Some(date) = std::env::split_paths(real_path)
        .map(|d| d.join("date"))
        .find(|p| p.is_file())
    {
        shims.push((
            "date".to_string(),
            format!(
                "#!/bin/sh\n# suture: the build time is SOURCE_DATE_EPOCH unless a date is given.\nfor a in \"$@\"; do\n  case \"$a\" in -d*|--date*|-r*|--reference*|-f*|--file*|-s*|--set*) exec '{0}' \"$@\" ;; esac\ndone\nexec '{0}' -d \"@$SOURCE_DATE_EPOCH\" \"$@\"\n",
                date.display()
            ),
        ));
    }
    for (name, text) in shims {
        let p = bin.join(name);
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, text)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// The project's build command failed; its output is kept in `log`.
#[derive(Debug, thiserror::Error)]
#[error("build command failed ({status}): {tail} (whole output: {})", log.display())]
pub struct BuildFailed {
    pub status: String,
    pub log: PathBuf,
    pub tail: String,
}

/// One build of the project.
pub struct Build<'a> {
    /// The original source folder (where the build appears to run).
    pub source: &'a Path,
    /// The work tree really built.
    pub tree: &'a Path,
    pub command: &'a str,
    /// Extra compiler flags given through the wrapper.
    pub flags: &'a str,
    /// Folder for the wrapper links and the object log.
    pub tools: &'a Path,
}

/// What a build compiled and linked, as the wrapper recorded it.
#[derive(Debug, Default)]
pub struct BuildRecord {
    /// Object hash → (source file in the tree, stored copy of the object).
    pub compiled: HashMap<String, (PathBuf, PathBuf)>,
    /// Link output in the tree → hashes of the objects that went in.
    pub links: Vec<(PathBuf, Vec<String>)>,
}

impl BuildRecord {
    /// The objects `artifact` was linked from, as (source, object copy), if its link was seen.
    pub fn objects_of(&self, artifact: &Path) -> Option<Vec<(PathBuf, PathBuf)>> {
        let name = artifact.file_name();
        let (_, hashes) = self
            .links
            .iter()
            .rev()
            .find(|(out, _)| out == artifact)
            .or_else(|| {
                self.links
                    .iter()
                    .rev()
                    .find(|(out, _)| out.file_name() == name)
            })?;
        Some(
            hashes
                .iter()
                .filter_map(|h| self.compiled.get(h).cloned())
                .collect(),
        )
    }

    /// Every object compiled (for builds whose link did not go through the wrapper).
    pub fn all_objects(&self) -> Vec<(PathBuf, PathBuf)> {
        let mut v: Vec<_> = self.compiled.values().cloned().collect();
        v.sort();
        v
    }
}

impl Build<'_> {
    /// Runs the build; returns what it compiled and linked.
    pub fn run(&self, log_to: &Path) -> Result<BuildRecord> {
        let bin = self.tools.join("bin");
        std::fs::create_dir_all(&bin)?;
        let me = std::env::current_exe().context("cannot find the suture binary")?;
        let real_path = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
        for name in wrapper::compiler_names(real_path.as_ref()) {
            let link = bin.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&me, &link)?;
        }
        write_shims(&bin, &real_path)?;
        let tag = self
            .tree
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("tree");
        let log = self.tools.join(format!("record-{tag}.log"));
        let store = self.tools.join(format!("objects-{tag}"));
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_dir_all(&store);
        let script = "mount --bind \"$SUTURE_TREE\" \"$SUTURE_SOURCE\" && cd \"$SUTURE_SOURCE\" && exec sh -c \"$SUTURE_BUILD_CMD\"";
        let output = std::fs::File::create(log_to)?;
        let st = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", script])
            .env("SUTURE_TREE", self.tree)
            .env("SUTURE_SOURCE", self.source)
            .env("SUTURE_BUILD_CMD", self.command)
            .env("PATH", format!("{}:{real_path}", bin.display()))
            .env("SOURCE_DATE_EPOCH", source_date_epoch())
            .env("CC", "gcc")
            .env("CXX", "g++")
            .env(wrapper::ENV_REAL_PATH, &real_path)
            .env(wrapper::ENV_FLAGS, self.flags)
            .env(wrapper::ENV_LOG, &log)
            .env(wrapper::ENV_STORE, &store)
            .stdout(output.try_clone()?)
            .stderr(output)
            .status()
            .context("cannot run unshare (util-linux) to build in a private mount namespace")?;
        if !st.success() {
            let out = std::fs::read_to_string(log_to).unwrap_or_default();
            let tail: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
            return Err(BuildFailed {
                status: st.to_string(),
                log: log_to.to_path_buf(),
                tail: tail[tail.len().saturating_sub(2)..].join(" / "),
            }
            .into());
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        // Recorded under the original path; the files live in the work tree.
        let in_tree = |p: &str| {
            let p = Path::new(p);
            match p.strip_prefix(self.source) {
                Ok(rel) => self.tree.join(rel),
                Err(_) => p.to_path_buf(),
            }
        };
        let mut record = BuildRecord::default();
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            match f.as_slice() {
                ["compile", hash, src] => {
                    let copy = store.join(format!("{hash}.o"));
                    record
                        .compiled
                        .insert(hash.to_string(), (in_tree(src), copy));
                }
                ["link", out, hashes] => record.links.push((
                    in_tree(out),
                    hashes.split(',').map(str::to_string).collect(),
                )),
                _ => {}
            }
        }
        Ok(record)
    }
}
