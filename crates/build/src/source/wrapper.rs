//! The compiler wrapper. The build's `cc`, `gcc`, `c++` and `g++` are links to the `suture`
//! binary in a private folder put first on `PATH`; invoked under those names it runs the real
//! compiler with extra flags (`-ffunction-sections -fdata-sections` for the diffing builds) and
//! records what went where:
//!
//! - every object it compiles is copied aside under its SHA-256, with the source it came from
//!   (`compile<TAB>hash<TAB>source`), so a build that renames or deletes objects (`.lo`) does
//!   not lose them;
//! - every link records its output and the hashes of the objects that went in, archive members
//!   included (`link<TAB>output<TAB>hash,hash,…`): that is how the builder knows which objects
//!   make up the target when a source is compiled twice (static and shared).

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Names under which `suture` acts as the compiler wrapper.
pub const COMPILERS: &[&str] = &["cc", "gcc", "c++", "g++"];
/// Environment: the `PATH` to find the real compiler in.
pub const ENV_REAL_PATH: &str = "SUTURE_WRAP_REAL_PATH";
/// Environment: extra flags, space-separated.
pub const ENV_FLAGS: &str = "SUTURE_WRAP_FLAGS";
/// Environment: the record file.
pub const ENV_LOG: &str = "SUTURE_WRAP_LOG";
/// Environment: where copies of compiled objects go.
pub const ENV_STORE: &str = "SUTURE_WRAP_STORE";

/// If `argv0` names a compiler and the wrapper environment is set, runs as the wrapper
/// (never returns); otherwise returns to let `suture` run normally.
pub fn maybe_run(argv0: &str) {
    let name = Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    if !COMPILERS.contains(&name) || std::env::var_os(ENV_REAL_PATH).is_none() {
        return;
    }
    let code = match run(name) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("suture compiler wrapper: {e}");
            127
        }
    };
    std::process::exit(code);
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    Ok(hex::encode(Sha256::digest(std::fs::read(path)?)))
}

fn run(name: &str) -> std::io::Result<i32> {
    let real_path = std::env::var_os(ENV_REAL_PATH).unwrap_or_default();
    let real = std::env::split_paths(&real_path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| std::io::Error::other(format!("no real `{name}` on {real_path:?}")))?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let compiling = args.iter().any(|a| a == "-c");
    let mut cmd = Command::new(&real);
    cmd.args(&args).env("PATH", &real_path);
    let log = std::env::var_os(ENV_LOG).map(PathBuf::from);
    let store = std::env::var_os(ENV_STORE).map(PathBuf::from);
    let (Some(log), Some(store)) = (log, store) else {
        return Err(cmd.exec());
    };
    if compiling {
        if let Ok(flags) = std::env::var(ENV_FLAGS) {
            cmd.args(flags.split_whitespace());
        }
    }
    let status = cmd.status()?;
    if !status.success() {
        return Ok(status.code().unwrap_or(1));
    }
    let cwd = std::env::current_dir()?;
    let mut records = Vec::new();
    if compiling {
        if let Some((obj, src)) = object_and_source(&args) {
            let obj = cwd.join(obj);
            let hash = sha256_file(&obj)?;
            std::fs::create_dir_all(&store)?;
            std::fs::copy(&obj, store.join(format!("{hash}.o")))?;
            records.push(format!("compile\t{hash}\t{}", cwd.join(src).display()));
        }
    } else if let Some(out) = link_output(&args) {
        let mut hashes = Vec::new();
        for input in args.iter().map(PathBuf::from) {
            let path = cwd.join(&input);
            match input.extension().and_then(|e| e.to_str()) {
                Some("o" | "lo" | "obj") if path.is_file() => hashes.push(sha256_file(&path)?),
                Some("a") if path.is_file() => hashes.extend(archive_members(&path)?),
                _ => {}
            }
        }
        if !hashes.is_empty() {
            records.push(format!(
                "link\t{}\t{}",
                cwd.join(out).display(),
                hashes.join(",")
            ));
        }
    }
    if !records.is_empty() {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        for r in records {
            writeln!(f, "{r}")?;
        }
    }
    Ok(0)
}

/// SHA-256 of every member of a static archive.
fn archive_members(path: &Path) -> std::io::Result<Vec<String>> {
    let data = std::fs::read(path)?;
    let archive =
        object::read::archive::ArchiveFile::parse(&*data).map_err(std::io::Error::other)?;
    let mut out = Vec::new();
    for member in archive.members() {
        let member = member.map_err(std::io::Error::other)?;
        let bytes = member.data(&*data).map_err(std::io::Error::other)?;
        out.push(hex::encode(Sha256::digest(bytes)));
    }
    Ok(out)
}

/// The object a `-c` compile writes, and its source (first C/C++ source argument).
fn object_and_source(args: &[OsString]) -> Option<(PathBuf, PathBuf)> {
    const SOURCES: &[&str] = &["c", "cc", "cpp", "cxx", "C", "c++"];
    let src = args.iter().map(PathBuf::from).find(|p| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| SOURCES.contains(&e))
    })?;
    let obj = match args.iter().position(|a| a == "-o") {
        Some(i) => PathBuf::from(args.get(i + 1)?),
        None => PathBuf::from(src.file_name()?).with_extension("o"),
    };
    Some((obj, src))
}

/// The output of a link (`-o X`, else `a.out`), if this looks like one.
fn link_output(args: &[OsString]) -> Option<PathBuf> {
    if args
        .iter()
        .any(|a| a == "-E" || a == "-S" || a == "-M" || a == "-MM")
    {
        return None;
    }
    match args.iter().position(|a| a == "-o") {
        Some(i) => args.get(i + 1).map(PathBuf::from),
        None => Some(PathBuf::from("a.out")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_object_and_source() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            object_and_source(&a(&["-O2", "-c", "src/x.c", "-o", "build/x.o"])),
            Some((PathBuf::from("build/x.o"), PathBuf::from("src/x.c")))
        );
        assert_eq!(
            object_and_source(&a(&["-c", "lib/y.cpp"])),
            Some((PathBuf::from("y.o"), PathBuf::from("lib/y.cpp")))
        );
        assert_eq!(object_and_source(&a(&["-c", "-o", "z.o"])), None);
        assert_eq!(
            link_output(&a(&["-shared", "-o", "libz.so.1", "a.lo"])),
            Some(PathBuf::from("libz.so.1"))
        );
        assert_eq!(link_output(&a(&["-E", "x.c"])), None);
    }
}
