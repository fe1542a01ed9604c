//! Helpers shared by the module crate's tests.

use std::cell::Cell;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Runs a reader (`identify`, `read_tables`) on `path` through `pread`, and counts the bytes it
/// asked for.
pub fn through_pread<T>(
    path: &Path,
    reader: impl FnOnce(&dyn Fn(u64, &mut [u8]) -> std::io::Result<()>, u64) -> T,
) -> (T, u64) {
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    let read = Cell::new(0u64);
    let out = reader(
        &|offset, buf: &mut [u8]| {
            read.set(read.get() + buf.len() as u64);
            file.read_exact_at(buf, offset)
        },
        len,
    );
    (out, read.get())
}

/// The regular files in `folder` smaller than `below` bytes, sorted (real modules to compare
/// readers on; the full parser is slow on huge files in a debug build).
pub fn files_in(folder: &str, below: u64) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(folder)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.metadata().is_ok_and(|m| m.is_file() && m.len() < below))
        .collect();
    entries.sort();
    entries
}
