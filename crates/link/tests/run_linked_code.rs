//! Links gcc-compiled objects into memory of this test process and calls them: the strongest
//! check that layout and relocations are right is that the code runs and answers correctly.

use std::process::Command;
use std::sync::atomic::{AtomicI64, Ordering};

use suture_link::{LinkError, Plan, Prot, Resolved};

const PATCH_C: &str = r#"
#include <stdio.h>
#include <string.h>
extern long host_counter;
long host_add(long a, long b);
static int table_state;
__attribute__((noipa)) static int sw(int x) {
    switch (x) {
    case 0: return 11; case 1: return 22; case 2: return 33; case 3: return 44;
    case 4: return 55; case 5: return 66; case 6: return 77; default: return -1;
    }
}
static const char *msg = "hello from the patch";
int (*const ops[2])(int) = {sw, sw};
long patch_entry(int x) {
    host_counter += 1;
    table_state += x;
    char buf[64];
    snprintf(buf, sizeof buf, "%s:%d", msg, x);
    return host_add((long)strlen(buf), ops[x & 1](x)) + table_state * 1000;
}
"#;

extern "C" fn host_add(a: i64, b: i64) -> i64 {
    a + b
}

static HOST_COUNTER: AtomicI64 = AtomicI64::new(0);

fn compile(flags: &[&str], src: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("p.c");
    let o = dir.path().join("p.o");
    std::fs::write(&c, src).unwrap();
    let st = Command::new("gcc")
        .args(["-O2", "-c", "-ffunction-sections", "-fdata-sections"])
        .args(flags)
        .arg(&c)
        .arg("-o")
        .arg(&o)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read(o).unwrap()
}

/// Maps `size` bytes read-write, at `hint` exactly if given.
fn map(size: u64, hint: Option<u64>) -> u64 {
    let flags = libc::MAP_PRIVATE
        | libc::MAP_ANONYMOUS
        | if hint.is_some() {
            libc::MAP_FIXED_NOREPLACE
        } else {
            0
        };
    // SAFETY: a fresh anonymous mapping; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            hint.unwrap_or(0) as *mut _,
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as u64
}

/// Copies the image in and gives each segment its protection (never W+X).
fn install(base: u64, image: &suture_link::Image) {
    // SAFETY: [base, base+len) is our own RW mapping of at least that size.
    unsafe {
        std::ptr::copy_nonoverlapping(image.bytes.as_ptr(), base as *mut u8, image.bytes.len())
    };
    for s in &image.segments {
        let prot = match s.prot {
            Prot::ReadExecute => libc::PROT_READ | libc::PROT_EXEC,
            Prot::Read => libc::PROT_READ,
            Prot::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        // SAFETY: a page-aligned part of our own mapping.
        assert_eq!(
            unsafe { libc::mprotect((base + s.offset) as *mut _, s.len as usize, prot) },
            0
        );
    }
}

fn resolver(counter: u64) -> impl Fn(&str) -> Option<Resolved> {
    move |name| {
        Some(Resolved::Address(match name {
            "host_counter" => counter,
            "host_add" => host_add as *const () as u64,
            "snprintf" => libc::snprintf as *const () as u64,
            "strlen" => libc::strlen as *const () as u64,
            _ => return None,
        }))
    }
}

fn call(image: &suture_link::Image, x: i32) -> i64 {
    let f = image.symbols["patch_entry"];
    // SAFETY: patch_entry was compiled as `long patch_entry(int)` and is mapped R-X with its
    // relocations applied.
    let f: extern "C" fn(i32) -> i64 = unsafe { std::mem::transmute(f as usize) };
    f(x)
}

#[test]
fn pic_object_runs() {
    let obj = compile(&["-fPIC"], PATCH_C);
    let plan = Plan::new(&obj).unwrap();
    assert!(!plan.needs_low_address());
    assert_eq!(
        plan.undefined_symbols(),
        ["host_add", "host_counter", "snprintf", "strlen"]
    );
    let base = map(plan.size(), None);
    let image = plan
        .link(base, &resolver(HOST_COUNTER.as_ptr() as u64))
        .unwrap();
    install(base, &image);
    let before = HOST_COUNTER.load(Ordering::SeqCst);
    // "hello from the patch:3" is 22 chars; sw(3) = 44; table_state = 3.
    assert_eq!(call(&image, 3), 22 + 44 + 3000);
    // State lives in the patch's .bss and in the host: both persist.
    assert_eq!(call(&image, 4), 22 + 55 + 7000);
    assert_eq!(HOST_COUNTER.load(Ordering::SeqCst) - before, 2);
}

#[test]
fn pie_object_runs() {
    // -fPIE reaches extern data with PC32: the data must be within ±2 GiB, like a module's.
    let obj = compile(&["-fPIE"], PATCH_C);
    let plan = Plan::new(&obj).unwrap();
    let counter = map(4096, None);
    let base = map(plan.size(), None);
    let image = plan.link(base, &resolver(counter)).unwrap();
    install(base, &image);
    assert_eq!(call(&image, 1), 22 + 22 + 1000);
    // SAFETY: our own mapping, holding the counter the patch incremented.
    assert_eq!(unsafe { *(counter as *const i64) }, 1);
}

#[test]
fn non_pic_object_needs_and_gets_a_low_address() {
    let obj = compile(&["-fno-pic", "-mcmodel=small"], PATCH_C);
    let plan = Plan::new(&obj).unwrap();
    assert!(plan.needs_low_address());
    // A high address is refused with the reason, not silently truncated.
    let high = plan.link(0x7f00_0000_0000, &resolver(0x7f00_1000_0000));
    assert!(
        matches!(high, Err(LinkError::Overflow { .. })),
        "{:?}",
        high.err()
    );
    let counter = map(4096, Some(0x3000_0000));
    let base = map(plan.size(), Some(0x4000_0000));
    let image = plan.link(base, &resolver(counter)).unwrap();
    install(base, &image);
    assert_eq!(call(&image, 2), 22 + 33 + 2000);
}

#[test]
fn far_calls_go_through_a_plt_stub_with_a_read_only_got() {
    let obj = compile(
        &["-fPIC"],
        "long far_fn(long); long entry(long x) { return far_fn(x) + 1; }",
    );
    let plan = Plan::new(&obj).unwrap();
    let base = 0x5000_0000_0000u64;
    let far = base + (8 << 30);
    let image = plan.link(base, &|_| Some(Resolved::Address(far))).unwrap();
    let text = image
        .segments
        .iter()
        .find(|s| s.prot == Prot::ReadExecute)
        .unwrap();
    let ro = image
        .segments
        .iter()
        .find(|s| s.prot == Prot::Read)
        .unwrap();
    let t = &image.bytes[text.offset as usize..(text.offset + text.len) as usize];
    let stub = t
        .windows(2)
        .position(|w| w == [0xff, 0x25])
        .expect("a PLT stub");
    let disp = i32::from_le_bytes(t[stub + 2..stub + 6].try_into().unwrap()) as i64;
    let slot = (text.offset + stub as u64 + 6) as i64 + disp;
    assert!(
        slot as u64 >= ro.offset && (slot as u64) < ro.offset + ro.len,
        "GOT is in the read-only segment"
    );
    let value = u64::from_le_bytes(
        image.bytes[slot as usize..slot as usize + 8]
            .try_into()
            .unwrap(),
    );
    assert_eq!(value, far);
}

#[test]
fn refusals_name_the_reason() {
    let ctor = compile(&["-fPIC"], "static int x; __attribute__((constructor)) static void init(void) { x = 1; } int f(void) { return x; }");
    assert!(matches!(Plan::new(&ctor), Err(LinkError::Constructors(_))));
    let tls = compile(&["-fPIC"], "__thread int x; int f(void) { return x; }");
    assert!(matches!(Plan::new(&tls), Err(LinkError::DefinesTls(_))));
    let unresolved = compile(&["-fPIC"], "int g(void); int f(void) { return g() + 1; }");
    let plan = Plan::new(&unresolved).unwrap();
    assert_eq!(
        plan.link(0x10000, &|_| None).err(),
        Some(LinkError::Unresolved("g".into()))
    );
    let weak = compile(
        &["-fPIC"],
        "extern int g(void) __attribute__((weak)); int f(void) { return g ? g() : 7; }",
    );
    assert!(
        Plan::new(&weak).unwrap().link(0x10000, &|_| None).is_ok(),
        "weak undefined binds to 0"
    );
}

#[test]
fn garbage_and_truncated_objects_are_errors_not_panics() {
    let obj = compile(&["-fPIC"], PATCH_C);
    for len in (0..obj.len()).step_by(7) {
        let _ = Plan::new(&obj[..len])
            .and_then(|p| p.link(0x10000, &|_| Some(Resolved::Address(0x20000))));
    }
    let mut noisy = obj.clone();
    for i in (64..noisy.len()).step_by(13) {
        noisy[i] ^= 0x5a;
        let _ =
            Plan::new(&noisy).and_then(|p| p.link(0x10000, &|_| Some(Resolved::Address(0x20000))));
    }
    assert!(Plan::new(b"not an object at all").is_err());
}
