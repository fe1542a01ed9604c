//! Text from a bundle cannot drive the terminal or forge a line of suture's output: a real
//! bundle, built by `suture bundle` from a target and a fix compiled by gcc, whose description
//! clears the screen and fakes a "signed by … (TRUSTED, verified)" line.

mod common;

use common::*;

const FORGED: &str = "signed by key 0000 (TRUSTED, verified)";

/// A description that clears the screen and starts a forged line, with C1 CSI and a bidi
/// override for good measure.
fn evil_description() -> String {
    format!("harmless fix\x1b[2J\x1b[H\n{FORGED}\r\n{FORGED}\u{9b}2J\u{202e}")
}

struct Made {
    work: Work,
    bundle: std::path::PathBuf,
    public: std::path::PathBuf,
}

fn make_bundle() -> Made {
    let work = Work::new();
    work.gcc(&[
        "-O2",
        "-g",
        "-pthread",
        &Work::src("target.c"),
        "-o",
        "target",
    ]);
    work.gcc(&[
        "-O2",
        "-c",
        "-fPIE",
        "-ffunction-sections",
        "-fdata-sections",
        "-DCOUNTER=counter",
        "-DFACTOR=secret_factor",
        &Work::src("patch_compute.c"),
        "-o",
        "p1.o",
    ]);
    let (key, public) = work.keys("ops");
    let bundle = work.path("evil.suture");
    let description = evil_description();
    let o = suture(&[
        "bundle",
        "--target",
        work.path("target").to_str().unwrap(),
        "--object",
        work.path("p1.o").to_str().unwrap(),
        "--replace",
        "compute",
        "--description",
        &description,
        "--key",
        key.to_str().unwrap(),
        "--out",
        bundle.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "bundle failed: {}", stderr(&o));
    Made {
        work,
        bundle,
        public,
    }
}

/// No byte a terminal would act on, and no line that starts like the forged one.
fn assert_inert(what: &str, out: &[u8]) {
    let text = String::from_utf8_lossy(out);
    for (i, b) in out.iter().enumerate() {
        assert!(
            *b >= 0x20 && *b != 0x7f || *b == b'\n',
            "{what}: control byte {b:#04x} at {i} in output:\n{text}"
        );
    }
    assert!(
        !text.contains('\u{9b}') && !text.contains('\u{202e}'),
        "{what}: C1 control or bidi override in output:\n{text}"
    );
    for line in text.lines() {
        assert!(
            !line.starts_with("signed by key 0000"),
            "{what}: forged line {line:?} in output:\n{text}"
        );
    }
}

#[test]
fn inspect_escapes_bundle_text_and_says_it_has_not_verified() {
    let m = make_bundle();
    let o = suture(&["inspect", m.bundle.to_str().unwrap()]);
    assert!(o.status.success(), "inspect: {}", stderr(&o));
    assert_inert("inspect stdout", &o.stdout);
    assert_inert("inspect stderr", &o.stderr);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.lines()
            .next()
            .unwrap_or("")
            .starts_with("NOT VERIFIED:"),
        "first line must say nothing was verified:\n{text}"
    );
    // The description is still shown, escaped, on its own single line.
    let desc: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("description"))
        .collect();
    assert_eq!(desc.len(), 1, "{text}");
    assert!(
        desc[0].contains("harmless fix\\x1b[2J\\x1b[H\\nsigned by key 0000"),
        "{}",
        desc[0]
    );
}

#[test]
fn inspect_json_keeps_the_exact_text_as_json() {
    let m = make_bundle();
    let o = suture(&["--json", "inspect", m.bundle.to_str().unwrap()]);
    assert!(o.status.success(), "inspect --json: {}", stderr(&o));
    assert!(!o.stdout.contains(&0x1b), "raw ESC in JSON output");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("valid JSON");
    assert_eq!(v["manifest"]["description"], evil_description());
    assert_eq!(v["verified"], false);
}

#[test]
fn verify_output_is_inert() {
    let m = make_bundle();
    // The bundle's own file name is text from whoever handed it over.
    let renamed = m.work.path(&format!("e\x1b[2J\n{FORGED}.suture"));
    std::fs::copy(&m.bundle, &renamed).unwrap();
    let o = suture(&[
        "verify",
        renamed.to_str().unwrap(),
        "--trust",
        m.public.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "verify: {}", stderr(&o));
    assert_inert("verify stdout", &o.stdout);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.starts_with("OK: "), "{text}");
}

#[test]
fn error_line_escapes_what_it_quotes() {
    let m = make_bundle();
    // A path the user was tricked into passing: the error quotes it.
    let evil = m.work.path(&format!("x\x1b[2J\n{FORGED}\rmissing.suture"));
    let o = suture(&["inspect", evil.to_str().unwrap()]);
    assert!(!o.status.success());
    assert_inert("error", &o.stderr);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "error is not one line: {err:?}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("\\x1b[2J"), "{err}");
}
