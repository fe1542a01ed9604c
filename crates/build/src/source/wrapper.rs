//! The compiler wrapper. The build's `cc`, `gcc`, `c++` and `g++` are links to the `suture`
//! binary in a private folder put first on `PATH`; invoked under those names it runs the real
//! compiler with extra flags (`-ffunction-sections -fdata-sections` for the diffing builds) and
//! records, for every object it compiles, which source it came from.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Names under which `suture` acts as the compiler wrapper.
pub const COMPILERS: &[&str] = &["cc", "gcc", "c++", "g++"];
/// Environment: the `PATH` to find the real compiler in.
pub const ENV_REAL_PATH: &str = "SUTURE_WRAP_REAL_PATH";
/// Environment: extra flags, space-separated.
pub const ENV_FLAGS: &str = "SUTURE_WRAP_FLAGS";
/// Environment: the log of compiled objects (`object<TAB>source`, one per line).
pub const ENV_LOG: &str = "SUTURE_WRAP_LOG";

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

fn run(name: &str) -> std::io::Result<i32> {
    let real_path = std::env::var_os(ENV_REAL_PATH).unwrap_or_default();
    let real = std::env::split_paths(&real_path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| std::io::Error::other(format!("no real `{name}` on {real_path:?}")))?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let compiling = args.iter().any(|a| a == "-c");
    let mut cmd = Command::new(&real);
    cmd.args(&args);
    if compiling {
        if let Ok(flags) = std::env::var(ENV_FLAGS) {
            cmd.args(flags.split_whitespace());
        }
        if let (Some(log), Some((obj, src))) = (std::env::var_os(ENV_LOG), object_and_source(&args))
        {
            let cwd = std::env::current_dir()?;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)?;
            writeln!(
                f,
                "{}\t{}",
                cwd.join(obj).display(),
                cwd.join(src).display()
            )?;
        }
    }
    cmd.env("PATH", &real_path);
    Err(cmd.exec())
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
        None => PathBuf::from(src.file_stem()?).with_extension("o"),
    };
    Some((obj, src))
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
    }
}
