//! Work trees: fresh copies of the source, the fix applied to one, and the project's own build
//! command run in them.
//!
//! Each build runs in a private mount namespace with its work tree bind-mounted over the
//! original source folder, so paths compiled into the code (`__FILE__`, debug info) are the
//! ones the deployed binary was built with, and the original folder is never written.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::wrapper;

/// Copies `source` to `dest` and deletes every ELF file in the copy: old build outputs must
/// never stand in for a fresh build.
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
    purge_elf(dest)
}

fn purge_elf(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        let path = entry.path();
        if ty.is_dir() {
            purge_elf(&path)?;
        } else if ty.is_file() {
            let mut head = [0u8; 4];
            let is_elf = std::fs::File::open(&path)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
                .is_ok()
                && &head == b"\x7fELF";
            let is_archive = path.extension().is_some_and(|e| e == "a");
            if is_elf || is_archive {
                std::fs::remove_file(&path)?;
            }
        }
    }
    Ok(())
}

/// Applies a unified diff (`-p1` as git and distro patches are, else `-p0`).
pub fn apply_diff(tree: &Path, diff: &Path) -> Result<()> {
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
    }
    bail!("{} does not apply to the source tree", diff.display())
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

impl Build<'_> {
    /// Runs the build; returns the objects compiled, as (object, source) paths inside `tree`.
    pub fn run(&self, log_to: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
        let bin = self.tools.join("bin");
        std::fs::create_dir_all(&bin)?;
        let me = std::env::current_exe().context("cannot find the suture binary")?;
        for name in wrapper::COMPILERS {
            let link = bin.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&me, &link)?;
        }
        let log = self
            .tools
            .join(format!("objects-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let real_path = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
        let script = "mount --bind \"$SUTURE_TREE\" \"$SUTURE_SOURCE\" && cd \"$SUTURE_SOURCE\" && exec sh -c \"$SUTURE_BUILD_CMD\"";
        let output = std::fs::File::create(log_to)?;
        let st = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", script])
            .env("SUTURE_TREE", self.tree)
            .env("SUTURE_SOURCE", self.source)
            .env("SUTURE_BUILD_CMD", self.command)
            .env("PATH", format!("{}:{real_path}", bin.display()))
            .env("CC", "gcc")
            .env("CXX", "g++")
            .env(wrapper::ENV_REAL_PATH, &real_path)
            .env(wrapper::ENV_FLAGS, self.flags)
            .env(wrapper::ENV_LOG, &log)
            .stdout(output.try_clone()?)
            .stderr(output)
            .status()
            .context("cannot run unshare (util-linux) to build in a private mount namespace")?;
        if !st.success() {
            bail!(
                "build command failed ({st}); its output is in {}",
                log_to.display()
            );
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let mut objects = Vec::new();
        for line in text.lines() {
            if let Some((obj, src)) = line.split_once('\t') {
                // Recorded under the original path; the files live in the work tree.
                let map = |p: &str| {
                    let p = Path::new(p);
                    match p.strip_prefix(self.source) {
                        Ok(rel) => self.tree.join(rel),
                        Err(_) => p.to_path_buf(),
                    }
                };
                objects.push((map(obj), map(src)));
            }
        }
        objects.sort();
        objects.dedup();
        Ok(objects)
    }
}
