//! The tables-only reader (`read_tables`) against reading the whole file, on real files: the
//! parser must see the same module (symbols, versions, build-id, unwind tables) while only a
//! fraction of a big library is read.

use std::path::{Path, PathBuf};

use suture_module::*;

mod common;

/// `read_tables` through `pread` on the file, counting the bytes it asked for.
fn tables_of(path: &Path) -> (Result<Vec<u8>, ModuleError>, u64) {
    common::through_pread(path, |read_at, len| read_tables(read_at, len, Tables::ALL))
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
        let entries = common::files_in(folder, 4 << 20);
        for path in entries.iter().take(150) {
            if compare(path).is_some() {
                compared += 1;
            }
        }
    }
    assert!(compared > 100, "only {compared} files");
}

/// The engine reads a module's symbols when it binds a patch and its unwind tables only when a
/// stack needs walking: each part alone gives the parser what the whole file gives for that
/// part (with the build-id in both), and the two together cost no more than one full read.
#[test]
fn symbols_and_unwind_tables_read_apart_are_those_of_the_whole_file() {
    let unwind_of = |m: &Module| {
        (
            m.eh_frame()
                .and_then(|(a, s)| m.bytes_at(a, s))
                .map(<[u8]>::to_vec),
            m.eh_frame_hdr()
                .and_then(|h| m.bytes_at(h.vaddr, h.size))
                .map(<[u8]>::to_vec),
        )
    };
    let mut compared = 0;
    let mut paths = vec![
        PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
        PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
    ];
    for folder in ["/usr/bin", "/usr/lib/x86_64-linux-gnu"] {
        paths.extend(common::files_in(folder, 4 << 20).into_iter().take(60));
    }
    for path in &paths {
        let Ok(whole) = std::fs::read(path) else {
            continue;
        };
        let Ok(want) = Module::parse(&whole) else {
            continue;
        };
        let part =
            |which| common::through_pread(path, |read_at, len| read_tables(read_at, len, which));
        let ((all, all_read), (symbols, symbols_read), (unwind, unwind_read)) = (
            part(Tables::ALL),
            part(Tables::SYMBOLS),
            part(Tables::UNWIND),
        );
        let (symbols, unwind) = (symbols.unwrap(), unwind.unwrap());
        let from_symbols = Module::parse(&symbols).unwrap();
        assert_eq!(from_symbols.symbols(), want.symbols(), "{}", path.display());
        assert_eq!(
            from_symbols.build_id(),
            want.build_id(),
            "{}",
            path.display()
        );
        let from_unwind = Module::parse_layout(&unwind).unwrap();
        assert_eq!(
            unwind_of(&from_unwind),
            unwind_of(&want),
            "{}",
            path.display()
        );
        assert_eq!(
            from_unwind.build_id(),
            want.build_id(),
            "{}",
            path.display()
        );
        all.unwrap();
        assert!(
            symbols_read < all_read || want.eh_frame().is_none(),
            "{}: symbols alone read {symbols_read} of {all_read} bytes",
            path.display()
        );
        assert!(
            unwind_read < all_read || want.symbols().is_empty(),
            "{}: unwind tables alone read {unwind_read} of {all_read} bytes",
            path.display()
        );
        compared += 1;
    }
    assert!(compared > 50, "only {compared} modules");
    // libc's unwind tables are most of what a full read costs: reading them only when a stack
    // needs walking is the point.
    let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
    let (_, symbols_read) = common::through_pread(libc, |read_at, len| {
        read_tables(read_at, len, Tables::SYMBOLS)
    });
    let (_, all_read) =
        common::through_pread(libc, |read_at, len| read_tables(read_at, len, Tables::ALL));
    assert!(
        symbols_read * 3 < all_read * 2,
        "libc: symbols {symbols_read} of {all_read}"
    );
}

/// Lying headers: whatever the parser makes of the whole file (a module, maybe without
/// symbols, or an error), it makes of the tables alone; never a panic.
#[test]
fn lying_headers_give_the_same_answer_as_the_whole_file() {
    let data = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
    let check = |bad: Vec<u8>, what: &str| {
        let len = bad.len() as u64;
        let sparse = read_tables(
            &|offset, buf: &mut [u8]| {
                let start = offset as usize;
                buf.copy_from_slice(&bad[start..start + buf.len()]);
                Ok(())
            },
            len,
            Tables::ALL,
        );
        let whole = Module::parse(&bad).map(|m| seen(&m));
        let from_tables = sparse.map(|d| Module::parse(&d).map(|m| seen(&m)));
        match (whole, from_tables) {
            (Ok(w), Ok(Ok(t))) => assert_eq!(t, w, "{what}"),
            (Err(_), Err(_)) | (Err(_), Ok(Err(_))) => {}
            (w, t) => panic!(
                "{what}: whole file {:?}, tables {:?}",
                w.err(),
                t.map(|t| t.err())
            ),
        }
    };
    let put = |at: usize, bytes: &[u8]| {
        let mut bad = data.clone();
        bad[at..at + bytes.len()].copy_from_slice(bytes);
        bad
    };
    let n = data.len() as u64;
    check(
        put(0x28, &(u64::MAX - 8).to_le_bytes()),
        "e_shoff overflows",
    );
    check(put(0x28, &(n - 10).to_le_bytes()), "e_shoff at the end");
    check(put(0x3c, &0xfff0u16.to_le_bytes()), "e_shnum too big");
    check(
        put(0x3e, &0xfff0u16.to_le_bytes()),
        "e_shstrndx out of range",
    );
    check(put(0x20, &(n - 8).to_le_bytes()), "e_phoff at the end");
    for cut in [10, 64, 100, 4096, data.len() / 2] {
        check(data[..cut].to_vec(), &format!("cut at {cut}"));
    }
}

/// Tables share bytes (a symbol table's strings are its version tables' too): none is read
/// twice, and tables side by side come in one read.
#[test]
fn no_byte_is_read_twice() {
    for path in [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
        "/usr/bin/bash",
    ] {
        let data = std::fs::read(path).unwrap();
        let reads = std::cell::RefCell::new(Vec::<(u64, u64)>::new());
        read_tables(
            &|offset, buf: &mut [u8]| {
                reads.borrow_mut().push((offset, buf.len() as u64));
                buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
                Ok(())
            },
            data.len() as u64,
            Tables::ALL,
        )
        .unwrap();
        let mut reads = reads.into_inner();
        reads.sort_unstable();
        for pair in reads.windows(2) {
            let ((a, alen), (b, _)) = (pair[0], pair[1]);
            assert!(a + alen <= b, "{path}: {pair:?} read twice");
        }
        assert!(reads.len() <= 12, "{path}: {} reads", reads.len());
    }
}

/// A lookup through the GNU hash table (from the tables alone, as the engine reads them) finds
/// exactly the definition a scan of all symbols finds, for every name each library exports —
/// default versions over hidden ones included — and nothing for names it does not export.
#[test]
fn hash_lookups_find_what_a_scan_of_all_symbols_finds() {
    let mut checked = 0;
    let mut entries: Vec<PathBuf> = common::files_in("/usr/lib/x86_64-linux-gnu", 8 << 20)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".so"))
        .collect();
    entries.insert(0, PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"));
    for path in entries.iter().take(60) {
        let (Ok(data), _) = tables_of(path) else {
            continue;
        };
        let Ok(module) = Module::parse(&data) else {
            continue;
        };
        let mut names: Vec<&str> = module
            .symbols()
            .iter()
            .filter(|s| s.exported)
            .map(|s| s.name.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        if suture_module::lookup_dynamic_hashed(&data, "memcpy").is_none() {
            continue; // no GNU hash table
        }
        let key = |s: &Symbol| (s.address, s.kind, s.binding, s.hidden_version);
        for name in names.iter().copied().chain(["no_such_name_anywhere", ""]) {
            let hashed = suture_module::lookup_dynamic_hashed(&data, name).unwrap();
            let scanned = suture_module::lookup_dynamic_in(module.symbols(), name);
            assert_eq!(
                hashed.as_ref().map(key),
                scanned.map(key),
                "{}: `{name}`",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked > 5_000, "only {checked} names");
}
