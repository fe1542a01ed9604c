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

/// Whether `name` is a C/C++ compiler driver as build systems spell it: `gcc`, `g++`, `cc`,
/// `c++`, `clang`, `clang++`, optionally with a target triplet (`x86_64-linux-gnu-gcc`, as
/// Debian's packaging calls it) and a version (`gcc-12`).
pub fn is_compiler(name: &str) -> bool {
    let base = name.rsplit_once("-linux-gnu-").map_or(name, |(_, b)| b);
    let base = match base.rsplit_once('-') {
        Some((b, v)) if !v.is_empty() && v.bytes().all(|c| c.is_ascii_digit() || c == b'.') => b,
        _ => base,
    };
    matches!(base, "cc" | "gcc" | "c++" | "g++" | "clang" | "clang++")
}

/// The compiler names to wrap: the usual four, and every other compiler driver in `path`.
pub fn compiler_names(path: &std::ffi::OsStr) -> Vec<String> {
    let mut names: Vec<String> = COMPILERS.iter().map(|s| s.to_string()).collect();
    for dir in std::env::split_paths(path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            if let Some(n) = e.file_name().to_str() {
                if is_compiler(n) && !names.iter().any(|m| m == n) {
                    names.push(n.to_string());
                }
            }
        }
    }
    names
}
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
    if !is_compiler(name) || std::env::var_os(ENV_REAL_PATH).is_none() {
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
    // The builds Suture compares keep their symbol tables: link-time stripping is dropped
    // (it changes no code; the deployed binary may still be stripped).
    let args = drop_strip_flags(std::env::args_os().skip(1).collect());
    let compiling = args.iter().any(|a| a == "-c");
    let mut cmd = Command::new(&real);
    cmd.args(&args).env("PATH", &real_path);
    let log = std::env::var_os(ENV_LOG).map(PathBuf::from);
    let store = std::env::var_os(ENV_STORE).map(PathBuf::from);
    let (Some(log), Some(store)) = (log, store) else {
        return Err(cmd.exec());
    };
    let flags = effective_flags(
        &real,
        &std::env::var(ENV_FLAGS).unwrap_or_default(),
        &store.join("probes"),
    );
    let cwd = std::env::current_dir()?;
    let mut records = Vec::new();
    // Runs one compile and records the objects it wrote, with their sources.
    let mut compile = |args: &[OsString], outputs: &[(PathBuf, PathBuf)]| -> std::io::Result<i32> {
        let status = Command::new(&real)
            .args(args)
            .args(&flags)
            .env("PATH", &real_path)
            .status()?;
        if !status.success() {
            return Ok(status.code().unwrap_or(1));
        }
        for (obj, src) in outputs {
            let obj = cwd.join(obj);
            let hash = sha256_file(&obj)?;
            std::fs::create_dir_all(&store)?;
            std::fs::copy(&obj, store.join(format!("{hash}.o")))?;
            records.push(format!("compile\t{hash}\t{}", cwd.join(src).display()));
        }
        Ok(0)
    };
    let mut args = args;
    if compiling {
        let code = compile(&args, &objects_and_sources(&args))?;
        if code != 0 {
            return Ok(code);
        }
    } else {
        // `cc -o app a.c b.c` compiles and links in one call: do it as gcc does internally,
        // one compile per source, so each object is seen, then link those objects.
        if let Some(split) = split_compile_and_link(&args, &store.join("split")) {
            for (compile_args, obj, src) in split.compiles {
                let code = compile(&compile_args, &[(obj, src)])?;
                if code != 0 {
                    return Ok(code);
                }
            }
            args = split.link;
        }
        let status = Command::new(&real)
            .args(&args)
            .env("PATH", &real_path)
            .status()?;
        if !status.success() {
            return Ok(status.code().unwrap_or(1));
        }
    }
    if let (false, Some(out)) = (compiling, link_output(&args)) {
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

/// Linker options that strip symbols, as gcc passes them on (`-Wl,-s`, `-Xlinker -S`).
const LINKER_STRIP: &[&str] = &[
    "-s",
    "-S",
    "-x",
    "--strip-all",
    "--strip-debug",
    "--discard-all",
];

/// `args` without the options that strip the output's symbols: `-s`, `--strip-all`,
/// `--strip-debug`, and those inside `-Wl,…` lists and after `-Xlinker`.
pub fn drop_strip_flags(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut iter = args.into_iter().peekable();
    while let Some(a) = iter.next() {
        let text = a.to_string_lossy().into_owned();
        if text == "-s" || text == "--strip-all" || text == "--strip-debug" {
            continue;
        }
        if text == "-Xlinker" {
            if let Some(next) = iter.peek() {
                if LINKER_STRIP.iter().any(|f| next == f) {
                    iter.next();
                    continue;
                }
            }
        }
        if let Some(list) = text.strip_prefix("-Wl,") {
            let kept: Vec<&str> = list
                .split(',')
                .filter(|f| !LINKER_STRIP.contains(f))
                .collect();
            if kept.is_empty() {
                continue;
            }
            out.push(OsString::from(format!("-Wl,{}", kept.join(","))));
            continue;
        }
        out.push(a);
    }
    out
}

/// The extra flags for this compiler: a flag written `?-mflag` is passed only if the compiler
/// accepts it (probed once per compiler and flag, the answer kept in `cache`).
fn effective_flags(real: &Path, flags: &str, cache: &Path) -> Vec<String> {
    flags
        .split_whitespace()
        .filter_map(|f| match f.strip_prefix('?') {
            Some(optional) => accepts(real, optional, cache).then(|| optional.to_string()),
            None => Some(f.to_string()),
        })
        .collect()
}

fn accepts(real: &Path, flag: &str, cache: &Path) -> bool {
    let key = hex::encode(&Sha256::digest(format!("{}\0{flag}", real.display()))[..8]);
    let answer = cache.join(format!("{key}.probe"));
    if let Ok(v) = std::fs::read_to_string(&answer) {
        return v == "1";
    }
    let ok = Command::new(real)
        .args([flag, "-x", "c", "-c", "/dev/null", "-o", "/dev/null"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _ = std::fs::create_dir_all(cache);
    let _ = std::fs::write(&answer, if ok { "1" } else { "0" });
    ok
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

/// The objects a `-c` compile writes, with their sources: `-o X` for a single source, else
/// each source's stem with `.o` in the working folder.
fn objects_and_sources(args: &[OsString]) -> Vec<(PathBuf, PathBuf)> {
    let sources: Vec<PathBuf> = args
        .iter()
        .filter(|a| is_source(a))
        .map(PathBuf::from)
        .collect();
    let named = args
        .iter()
        .position(|a| a == "-o")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    match (named, sources.as_slice()) {
        (Some(obj), [src]) => vec![(obj, src.clone())],
        _ => sources
            .iter()
            .filter_map(|src| {
                Some((
                    PathBuf::from(src.file_name()?).with_extension("o"),
                    src.clone(),
                ))
            })
            .collect(),
    }
}

const SOURCES: &[&str] = &["c", "cc", "cpp", "cxx", "C", "c++"];

fn is_source(arg: &OsString) -> bool {
    let p = Path::new(arg);
    !arg.to_string_lossy().starts_with('-')
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| SOURCES.contains(&e))
}

/// A compile-and-link call split in two steps.
struct Split {
    /// (arguments, object, source) of each compile.
    compiles: Vec<(Vec<OsString>, PathBuf, PathBuf)>,
    /// The link, with each source replaced by its object.
    link: Vec<OsString>,
}

/// Splits `cc [opts] a.c b.c -o out` into one `-c` compile per source (objects in `dir`) and
/// a link of the objects; `None` if there is no source to compile or the call is not a plain
/// one (a language given with `-x`, a source on stdin, preprocessing or assembly only).
fn split_compile_and_link(args: &[OsString], dir: &Path) -> Option<Split> {
    link_output(args)?;
    if args.iter().any(|a| a == "-x" || a == "-") {
        return None;
    }
    // Options whose value is the next argument, which is then not a source.
    const TAKES_VALUE: &[&str] = &["-o", "-MF", "-MT", "-MQ", "-Xlinker", "-T", "-include"];
    let mut sources = Vec::new();
    let mut skip = false;
    for (i, a) in args.iter().enumerate() {
        if std::mem::take(&mut skip) {
            continue;
        }
        if TAKES_VALUE.iter().any(|t| a == t) {
            skip = true;
        } else if is_source(a) {
            sources.push(i);
        }
    }
    if sources.is_empty() {
        return None;
    }
    // Everything but the sources and the output: the options every compile shares.
    let mut common = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "-o" {
            i += 2;
            continue;
        }
        if !sources.contains(&i) {
            common.push(args[i].clone());
        }
        i += 1;
    }
    std::fs::create_dir_all(dir).ok()?;
    let mut compiles = Vec::new();
    let mut link = args.to_vec();
    for (n, &i) in sources.iter().enumerate() {
        let src = PathBuf::from(&args[i]);
        let stem = src.file_stem()?.to_string_lossy().into_owned();
        let obj = dir.join(format!("{}-{n}-{stem}.o", std::process::id()));
        let mut c = common.clone();
        c.extend([
            OsString::from("-c"),
            args[i].clone(),
            OsString::from("-o"),
            obj.clone().into_os_string(),
        ]);
        compiles.push((c, obj.clone(), src));
        link[i] = obj.into_os_string();
    }
    Some(Split { compiles, link })
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
    fn drops_link_time_stripping() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            drop_strip_flags(a(&[
                "-O2",
                "-s",
                "-o",
                "app",
                "-Wl,-s",
                "-Wl,-z,relro,--strip-all,-O1",
                "-Xlinker",
                "-S",
                "-Wl,--strip-debug",
                "--strip-all",
                "a.o",
                "-S"
            ])),
            a(&["-O2", "-o", "app", "-Wl,-z,relro,-O1", "a.o", "-S"])
        );
    }

    #[test]
    fn knows_compiler_driver_names() {
        for n in [
            "gcc",
            "g++",
            "cc",
            "c++",
            "x86_64-linux-gnu-gcc",
            "gcc-12",
            "x86_64-linux-gnu-g++-12",
            "clang++",
        ] {
            assert!(is_compiler(n), "{n}");
        }
        for n in [
            "suture",
            "gcc-ar",
            "x86_64-linux-gnu-gcc-nm-12",
            "ld",
            "cc1",
        ] {
            assert!(!is_compiler(n), "{n}");
        }
    }

    #[test]
    fn finds_objects_sources_and_splits_one_call_builds() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            objects_and_sources(&a(&["-O2", "-c", "src/x.c", "-o", "build/x.o"])),
            vec![(PathBuf::from("build/x.o"), PathBuf::from("src/x.c"))]
        );
        assert_eq!(
            objects_and_sources(&a(&["-c", "lib/y.cpp", "z.c"])),
            vec![
                (PathBuf::from("y.o"), PathBuf::from("lib/y.cpp")),
                (PathBuf::from("z.o"), PathBuf::from("z.c"))
            ]
        );
        assert!(objects_and_sources(&a(&["-c", "-o", "z.o"])).is_empty());
        let split = split_compile_and_link(
            &a(&["-O2", "-o", "app", "main.c", "-Iinc", "lib.c", "-lm"]),
            Path::new("/tmp/s"),
        )
        .unwrap();
        assert_eq!(split.compiles.len(), 2);
        let first: Vec<String> = split.compiles[0]
            .0
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert_eq!(&first[..5], ["-O2", "-Iinc", "-lm", "-c", "main.c"]);
        assert_eq!(split.link[3], split.compiles[0].1.clone().into_os_string());
        assert_eq!(split.link[5], split.compiles[1].1.clone().into_os_string());
        assert!(
            split_compile_and_link(&a(&["-o", "app", "a.o", "b.o"]), Path::new("/tmp/s")).is_none()
        );
        assert_eq!(
            link_output(&a(&["-shared", "-o", "libz.so.1", "a.lo"])),
            Some(PathBuf::from("libz.so.1"))
        );
        assert_eq!(link_output(&a(&["-E", "x.c"])), None);
    }
}
