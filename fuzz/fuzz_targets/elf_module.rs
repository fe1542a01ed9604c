//! The ELF reader on arbitrary bytes, with every query the bundler and the engine make of a
//! module: none may panic or hang on a malformed file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use suture_module::{load_bias, read_build_id, Lookup, Module};

fuzz_target!(|data: &[u8]| {
    let quick = read_build_id(data);
    let Ok(m) = Module::parse(data) else {
        return;
    };
    // Both readers must agree on the build-id.
    if let Ok(id) = quick {
        assert_eq!(id.as_deref(), m.build_id());
    }
    let _ = m.build_id_hex();
    let _ = m.kind();
    let _ = m.has_symtab();
    let _ = m.tls_segment();
    let _ = m.vaddr_range();
    for seg in m.load_segments() {
        let _ = m.bytes_at(seg.vaddr, seg.filesz);
        let _ = m.bytes_from(seg.vaddr);
        let _ = m.bytes_from(seg.vaddr.wrapping_add(seg.filesz).wrapping_sub(1));
        let _ = load_bias(&m, 0x7f00_0000_0000, seg.offset & !0xfff);
    }
    // What the unwinder reads.
    if let Some(h) = m.eh_frame_hdr() {
        let _ = m.bytes_at(h.vaddr, h.size);
    }
    if let Some((vaddr, size)) = m.eh_frame() {
        let _ = m.bytes_at(vaddr, size);
        let _ = m.bytes_from(vaddr);
    }
    // What the bundler and the engine look up: the function bytes behind each symbol.
    for s in m.symbols().iter().take(256) {
        match m.lookup(&s.name) {
            Lookup::Unique(found) => {
                let _ = m.bytes_at(found.address, found.size);
            }
            Lookup::Ambiguous(all) => assert!(all.len() > 1),
            Lookup::NotFound => panic!("{:?} is a symbol but lookup cannot find it", s.name),
        }
        let _ = m.lookup_dynamic(&s.name);
    }
    let _ = m.lookup("main");
    let exports = m.dynamic_exports();
    for (name, s) in exports.iter().take(256) {
        assert_eq!(*name, s.name);
        let _ = m.bytes_at(s.address, s.size);
    }
});
