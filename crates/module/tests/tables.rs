//! The tables-only reader (`read_tables`) against reading the whole file, on real files: the
//! parser must see the same module (symbols, versions, build-id, unwind tables) while only a
//! fraction of a big library is read.

use std::cell::Cell;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use suture_module::*;

/// `read_tables` through `pread` on the file, counting the bytes it asked for.
fn tables_of(path: &Path) -> (Result<Vec<u8>, ModuleError>, u64) {
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    let read = Cell::new(0u64);
    let data = read_tables(
        &|offset, buf: &mut [u8]| {
            read.set(read.get() + buf.len() as u64);
            file.read_exact_at(buf, offset)
        },
        len,
    );
    (data, read.get())
}

/// Everything the engine takes from a parsed module.
fn seen(m: &Module) -> impl PartialEq + std::fmt::Debug {
    let eh_frame = m
        .eh_frame()
        .and_then(|(a, s)| m.bytes_at(a, s))
        .map(<[u8]>::to_vec);
    let hdr = m
        .eh_frame_hdr()
        .and_then(|h| m.bytes_at(h.vaddr, h.size))
        .map(<[u8]>::to_vec);
    (
        m.build_id().map(<[u8]>::to_vec),
        m.kind(),
        m.load_segments().to_vec(),
        m.tls_segment(),
        m.symbols().to_vec(),
        m.has_symtab(),
        eh_frame,
        hdr,
    )
}

fn compare(path: &Path) -> Option<(u64, u64)> {
    let whole = std::fs::read(path).ok()?;
    let (sparse, read) = tables_of(path);
    match (
        Module::parse(&whole),
        sparse.map(|d| (Module::parse(&d).map(|m| seen(&m)), d)),
    ) {
        (Ok(want), Ok((Ok(got), _))) => assert_eq!(got, seen(&want), "{}", path.display()),
        (Err(_), Err(_)) | (Err(_), Ok((Err(_), _))) => {}
        (want, got) => panic!(
            "{}: whole file {:?}, tables only {:?}",
            path.display(),
            want.map(|m| seen(&m)).err(),
            got.map(|g| g.0.err())
        ),
    }
    Some((read, whole.len() as u64))
}

#[test]
fn the_parser_sees_the_same_module_from_its_tables_alone() {
    let (read, len) = compare(Path::new("/lib/x86_64-linux-gnu/libc.so.6")).unwrap();
    // libc: symbols, versions and unwind tables, not its 1.4 MB of code.
    assert!(read * 4 < len, "libc: read {read} of {len} bytes");
    let mut compared = 0;
    for folder in ["/usr/bin", "/usr/lib/x86_64-linux-gnu"] {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(folder)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            // (The full parser is slow on huge files in a debug build.)
            .filter(|p| p.metadata().is_ok_and(|m| m.is_file() && m.len() < 4 << 20))
            .collect();
        entries.sort();
        for path in entries.iter().take(150) {
            if compare(path).is_some() {
                compared += 1;
            }
        }
    }
    assert!(compared > 100, "only {compared} files");
}

#[test]
fn lying_section_headers_are_errors_not_panics() {
    let data = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
    let read_from = |bytes: Vec<u8>| {
        let len = bytes.len() as u64;
        read_tables(
            &move |offset, buf: &mut [u8]| {
                let start = offset as usize;
                buf.copy_from_slice(&bytes[start..start + buf.len()]);
                Ok(())
            },
            len,
        )
    };
    // e_shoff past the end, a section count that overflows, a string table index out of range.
    for (at, value) in [(0x28usize, u64::MAX - 8), (0x28, data.len() as u64 - 10)] {
        let mut bad = data.clone();
        bad[at..at + 8].copy_from_slice(&value.to_le_bytes());
        assert!(read_from(bad).is_err());
    }
    let mut bad = data.clone();
    bad[0x3c..0x3e].copy_from_slice(&0xfff0u16.to_le_bytes()); // e_shnum
    let _ = read_from(bad); // error or fewer sections, never a panic
    let mut bad = data.clone();
    bad[0x3e..0x40].copy_from_slice(&0xfff0u16.to_le_bytes()); // e_shstrndx
    let _ = read_from(bad);
    for cut in [10, 64, 100, 4096] {
        assert!(read_from(data[..cut].to_vec()).is_err(), "cut at {cut}");
    }
}
