//! Reading real modules built by gcc: every kind the engine patches.

use std::path::{Path, PathBuf};
use std::process::Command;

use suture_module::*;

const SRC: &str = r#"
#include <stdio.h>
int exported_counter = 5;
__attribute__((noinline)) int exported_fn(int x) { return x * 7 + exported_counter; }
__attribute__((noinline)) static int local_fn(int x) { return x + 3; }
int main(int argc, char **argv) { (void)argv; printf("%d\n", exported_fn(argc) + local_fn(argc)); return 0; }
"#;
const SECOND: &str = "static int counter; int bump(void) { return ++counter; }";
const FIRST: &str = "static int counter; int bump2(void) { return counter += 2; }";

fn build(dir: &Path, out: &str, flags: &[&str], files: &[(&str, &str)]) -> PathBuf {
    let mut args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    for (name, src) in files {
        std::fs::write(dir.join(name), src).unwrap();
        args.push(dir.join(name).display().to_string());
    }
    let path = dir.join(out);
    let st = Command::new("gcc")
        .args(&args)
        .arg("-o")
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success());
    path
}

/// `nm` says where a symbol is.
fn nm(path: &Path, sym: &str) -> u64 {
    let out = Command::new("nm").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[2] == sym).then(|| u64::from_str_radix(f[0], 16).unwrap())
        })
        .unwrap()
}

/// The build-id as `readelf -n` prints it.
fn readelf_build_id(path: &Path) -> String {
    let out = Command::new("readelf")
        .arg("-n")
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn every_kind_of_module() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [
        ("pie", vec!["-O2"], ModuleKind::Dynamic),
        (
            "nopie",
            vec!["-O2", "-no-pie", "-fno-pie"],
            ModuleKind::Executable,
        ),
        ("static", vec!["-O2", "-static"], ModuleKind::Executable),
        (
            "lib.so",
            vec!["-O2", "-shared", "-fPIC"],
            ModuleKind::Dynamic,
        ),
    ];
    for (name, flags, kind) in cases {
        let path = build(d, name, &flags, &[("m.c", SRC)]);
        let data = std::fs::read(&path).unwrap();
        let m = Module::parse(&data).unwrap();
        assert_eq!(m.kind(), kind, "{name}");
        assert_eq!(m.build_id_hex().unwrap(), readelf_build_id(&path), "{name}");
        assert_eq!(
            read_build_id(&data).unwrap().map(hex::encode),
            m.build_id_hex()
        );
        let Lookup::Unique(f) = m.lookup("exported_fn") else {
            panic!("{name}: exported_fn")
        };
        assert_eq!(f.address, nm(&path, "exported_fn"), "{name}");
        assert_eq!(f.kind, SymbolKind::Function);
        assert!(f.size > 0);
        // The function's bytes as the file holds them.
        let code = m.bytes_at(f.address, f.size).unwrap();
        assert_eq!(code.len() as u64, f.size);
        let Lookup::Unique(l) = m.lookup("local_fn") else {
            panic!("{name}: local_fn")
        };
        assert_eq!(l.binding, SymbolBinding::Local);
        // Static executables are linked without .eh_frame_hdr but keep .eh_frame.
        assert!(
            m.eh_frame_hdr().is_some() || m.eh_frame().is_some(),
            "{name}: unwind tables"
        );
    }
}

#[test]
fn stripped_module_keeps_its_build_id_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let path = build(
        dir.path(),
        "lib.so",
        &["-O2", "-shared", "-fPIC"],
        &[("m.c", SRC)],
    );
    let id = readelf_build_id(&path);
    assert!(Command::new("strip").arg(&path).status().unwrap().success());
    let data = std::fs::read(&path).unwrap();
    let m = Module::parse(&data).unwrap();
    assert!(!m.has_symtab());
    assert_eq!(m.build_id_hex().unwrap(), id);
    assert!(
        matches!(m.lookup("exported_fn"), Lookup::Unique(_)),
        "exported via .dynsym"
    );
    assert!(
        matches!(m.lookup("local_fn"), Lookup::NotFound),
        "locals are gone"
    );
}

#[test]
fn two_statics_with_one_name_are_ambiguous() {
    let dir = tempfile::tempdir().unwrap();
    let path = build(
        dir.path(),
        "two.so",
        &["-O0", "-shared", "-fPIC"],
        &[("a.c", FIRST), ("b.c", SECOND)],
    );
    let data = std::fs::read(path).unwrap();
    let m = Module::parse(&data).unwrap();
    match m.lookup("counter") {
        Lookup::Ambiguous(all) => assert_eq!(all.len(), 2),
        other => panic!("expected ambiguous, got {other:?}"),
    }
}

#[test]
fn system_libc_exports_default_versions_and_ifuncs() {
    let data = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
    let m = Module::parse(&data).unwrap();
    let memcpy = m.lookup_dynamic("memcpy").unwrap();
    assert_eq!(memcpy.kind, SymbolKind::Ifunc);
    assert!(
        !memcpy.hidden_version,
        "the default memcpy@@, not the old memcpy@"
    );
    assert_eq!(
        m.lookup_dynamic("printf").unwrap().kind,
        SymbolKind::Function
    );
    assert!(m.lookup_dynamic("no_such_symbol_here").is_none());
    // The one-pass table gives every export the definition the lookup gives.
    let exports = m.dynamic_exports();
    assert!(exports.len() > 2000, "{}", exports.len());
    for (name, sym) in &exports {
        let one = m.lookup_dynamic(name).unwrap();
        assert_eq!(
            (one.address, one.hidden_version),
            (sym.address, sym.hidden_version),
            "{name}"
        );
    }
}

#[test]
fn load_bias_from_a_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let path = build(dir.path(), "pie", &["-O2"], &[("m.c", SRC)]);
    let data = std::fs::read(path).unwrap();
    let m = Module::parse(&data).unwrap();
    assert_eq!(load_bias(&m, 0x5555_5555_4000, 0), Some(0x5555_5555_4000));
}

#[test]
fn garbage_and_truncated_modules_are_errors_not_panics() {
    let data = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
    for len in (0..4096).chain((4096..data.len()).step_by(9973)) {
        let _ = Module::parse(&data[..len]);
        let _ = read_build_id(&data[..len]);
    }
    assert_eq!(Module::parse(b"hello").err(), Some(ModuleError::NotElf));
    let mut elf32 = data[..64].to_vec();
    elf32[4] = 1;
    assert_eq!(Module::parse(&elf32).err(), Some(ModuleError::Elf32));
}

#[test]
fn an_unstripped_library_still_lists_its_exports() {
    // Its .symtab repeats every export of .dynsym: the exports must not be lost in the merge.
    let dir = tempfile::tempdir().unwrap();
    let lib = build(
        dir.path(),
        "libunstripped.so",
        &["-O2", "-shared", "-fPIC"],
        &[("lib.c", "int shared_fn(int x) { return x + 1; } static int hidden(int x) { return x; } int (*keep)(int) = hidden;")],
    );
    let data = std::fs::read(&lib).unwrap();
    let m = Module::parse(&data).unwrap();
    let exports = m.dynamic_exports();
    assert_eq!(
        exports.get("shared_fn").map(|s| s.address),
        Some(nm(&lib, "shared_fn"))
    );
    assert!(
        !exports.contains_key("hidden"),
        "a static function is no export"
    );
    assert!(m.lookup_dynamic("shared_fn").is_some());
    // One entry per function: the merge does not duplicate it.
    assert_eq!(
        m.symbols().iter().filter(|s| s.name == "shared_fn").count(),
        1
    );
}
