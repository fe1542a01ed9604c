//! The header-only reader (`identify`) against the full parser, on real files: it must give
//! the same identity while reading a few KB, whatever the size of the file.

use std::path::{Path, PathBuf};
use std::process::Command;

use suture_module::*;

mod common;

/// `identify` through `pread` on the file, counting the bytes it asked for.
fn identify_file(path: &Path) -> (Result<Identity, ModuleError>, u64) {
    common::through_pread(path, |read_at, len| identify(read_at, len))
}

/// The identity as the full parser sees it.
fn full(data: &[u8]) -> Result<Identity, ModuleError> {
    let m = Module::parse(data)?;
    Ok(Identity {
        build_id: m.build_id().map(<[u8]>::to_vec),
        kind: m.kind(),
        segments: m.load_segments().to_vec(),
        tls: m.tls_segment(),
    })
}

fn gcc(dir: &Path, out: &str, flags: &[&str], src: &str) -> PathBuf {
    let c = dir.join(format!("{out}.c"));
    std::fs::write(&c, src).unwrap();
    let path = dir.join(out);
    let st = Command::new("gcc")
        .args(flags)
        .arg(&c)
        .arg("-o")
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success(), "gcc {flags:?}");
    path
}

const MAIN: &str = "__thread int t = 3; int main(void) { return t - 3; }";

#[test]
fn same_identity_as_the_full_parser_on_real_modules() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let static_exe = gcc(d, "static", &["-O2", "-static"], MAIN);
    let no_build_id = gcc(d, "noid", &["-O2", "-Wl,--build-id=none"], MAIN);
    let nopie = gcc(d, "nopie", &["-O2", "-no-pie", "-fno-pie"], MAIN);
    let cases: Vec<(PathBuf, ModuleKind, bool, bool)> = vec![
        // path, kind, has a build-id, has TLS
        ("/bin/true".into(), ModuleKind::Dynamic, true, false),
        (
            "/lib/x86_64-linux-gnu/libc.so.6".into(),
            ModuleKind::Dynamic,
            true,
            true,
        ),
        (static_exe, ModuleKind::Executable, true, true),
        (nopie, ModuleKind::Executable, true, true),
        (no_build_id, ModuleKind::Dynamic, false, true),
    ];
    for (path, kind, has_id, has_tls) in cases {
        let data = std::fs::read(&path).unwrap();
        let expected = full(&data).unwrap();
        let (got, bytes) = identify_file(&path);
        let got = got.unwrap();
        assert_eq!(got, expected, "{}", path.display());
        assert_eq!(got.kind, kind, "{}", path.display());
        assert_eq!(got.build_id.is_some(), has_id, "{}", path.display());
        assert_eq!(got.tls.is_some(), has_tls, "{}", path.display());
        assert!(!got.segments.is_empty());
        // Header + program headers + notes: a few KB, however big the file.
        assert!(
            bytes <= 8192,
            "{}: read {bytes} of {} bytes",
            path.display(),
            data.len()
        );
    }
}

/// Every ELF file in the system's binary and library folders: whatever the full parser says
/// (identity or error kind), the header-only reader says too.
#[test]
fn agrees_with_the_full_parser_on_every_system_binary() {
    let mut compared = 0;
    for folder in ["/usr/bin", "/usr/lib/x86_64-linux-gnu"] {
        let entries = common::files_in(folder, 4 << 20);
        for path in entries.iter().take(150) {
            let Ok(data) = std::fs::read(path) else {
                continue;
            };
            let (got, _) = identify_file(path);
            match (full(&data), got) {
                (Ok(want), Ok(got)) => assert_eq!(got, want, "{}", path.display()),
                (Err(want), Err(got)) => assert_eq!(
                    std::mem::discriminant(&got),
                    std::mem::discriminant(&want),
                    "{}: {got} vs {want}",
                    path.display()
                ),
                (want, got) => panic!("{}: full {want:?}, header-only {got:?}", path.display()),
            }
            compared += 1;
        }
    }
    assert!(compared > 100, "only {compared} files");
}

#[test]
fn truncated_garbage_and_lying_headers_are_errors_not_panics() {
    let data = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
    let from = |bytes: &[u8], len: u64| {
        identify(
            &|offset, buf: &mut [u8]| {
                let start = usize::try_from(offset).unwrap();
                match bytes.get(start..start + buf.len()) {
                    Some(b) => {
                        buf.copy_from_slice(b);
                        Ok(())
                    }
                    None => Err(std::io::ErrorKind::UnexpectedEof.into()),
                }
            },
            len,
        )
    };
    // A file cut short: never a panic, and an error as soon as the headers are cut.
    for len in 0..4096 {
        let cut = &data[..len];
        let got = from(cut, len as u64);
        assert_eq!(got.is_ok(), full(cut).is_ok(), "cut at {len}");
    }
    // A read that fails where the length promised bytes: an I/O error.
    assert!(matches!(
        from(&data[..100], data.len() as u64),
        Err(ModuleError::Io(_))
    ));
    assert_eq!(from(b"hello", 5).err(), Some(ModuleError::NotElf));
    // Too many program headers claimed: refused without reading them.
    let mut many = data[..64].to_vec();
    many[56..58].copy_from_slice(&0xffffu16.to_le_bytes()); // e_phnum = PN_XNUM
    assert!(matches!(
        from(&many, data.len() as u64),
        Err(ModuleError::Malformed(_))
    ));
}
