//! `suture build` end to end: a small project built by its own `make`, the deployed binary
//! running, a fix as a unified diff, the bundle built from it and applied live; and every kind
//! of fix that cannot be live gets refused with the reason and no bundle.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const MAIN_C: &str = r#"#include <stdio.h>
#include <string.h>
#include <unistd.h>
const char *answer(const char *in);
int main(void) {
    char line[256];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        printf("%s\n", answer(line));
    }
    return 0;
}
"#;

const MAKEFILE_C: &str = "CFLAGS ?= -O2 -g\nOBJS = main.o $(patsubst %.c,%.o,$(filter-out main.c,$(wildcard *.c)))\napp: $(OBJS)\n\t$(CC) $(CFLAGS) -o app $(OBJS)\n%.o: %.c\n\t$(CC) $(CFLAGS) -c $< -o $@\n";

struct Case<'a> {
    /// Files of the project besides main.c and the Makefile.
    files: &'a [(&'a str, &'a str)],
    /// Files as the fix leaves them.
    fixed: &'a [(&'a str, &'a str)],
    /// (input, answer before, answer after)
    checks: &'a [(&'a str, &'a str, &'a str)],
}

/// Writes a project file, creating its folder.
fn write_file(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
}

struct Project {
    work: Work,
    key: PathBuf,
    public: PathBuf,
    /// More arguments for `suture build` (`--accept new-state`).
    extra: Vec<&'static str>,
}

impl Project {
    /// Writes src/ and fixed/, builds src/ (the deployment), writes fix.diff.
    fn new(
        files: &[(&str, &str)],
        fixed: &[(&str, &str)],
        main: Option<&str>,
        makefile: Option<&str>,
    ) -> Project {
        let work = Work::new();
        for dir in ["src", "fixed"] {
            let d = work.path(dir);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("Makefile"), makefile.unwrap_or(MAKEFILE_C)).unwrap();
            if let Some(m) = main.or(Some(MAIN_C)).filter(|m| !m.is_empty()) {
                std::fs::write(d.join("main.c"), m).unwrap();
            }
            for (name, body) in files {
                write_file(&d.join(name), body);
            }
        }
        for (name, body) in fixed {
            write_file(&work.path("fixed").join(name), body);
        }
        let diff = Command::new("diff")
            .args(["-ruN", "src", "fixed"])
            .current_dir(work.dir.path())
            .output()
            .unwrap();
        std::fs::write(work.path("fix.diff"), &diff.stdout).unwrap();
        std::fs::remove_dir_all(work.path("fixed")).unwrap();
        let st = Command::new("make")
            .arg("-s")
            .current_dir(work.path("src"))
            .status()
            .unwrap();
        assert!(st.success(), "deployed build failed");
        let (key, public) = work.keys("builder");
        Project {
            work,
            key,
            public,
            extra: Vec::new(),
        }
    }

    fn build(&self, target: &Path, artifact: &str, out: &str) -> std::process::Output {
        let (src, diff, out) = (
            self.work.path("src"),
            self.work.path("fix.diff"),
            self.work.path(out),
        );
        let mut args = vec![
            "--json",
            "build",
            "--source",
            src.to_str().unwrap(),
            "--diff",
            diff.to_str().unwrap(),
            "--target",
            target.to_str().unwrap(),
            "--artifact",
            artifact,
            "--build-cmd",
            "make",
            "--key",
            self.key.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(&self.extra);
        suture(&args)
    }
}

/// Builds the patch from the diff and applies it to the running deployed program.
fn patch_live(case: &Case) -> serde_json::Value {
    let p = Project::new(case.files, case.fixed, None, None);
    live(&p, case.checks).0
}

/// [`patch_live`] for a fix that brings new state: refused as `new-state` naming `state`,
/// then built with `--accept new-state`, which the manifest records.
fn patch_live_accepting_new_state(case: &Case, state: &[&str]) -> serde_json::Value {
    let mut p = Project::new(case.files, case.fixed, None, None);
    for s in state {
        assert_refused(&p, "new-state", s);
    }
    p.extra = vec!["--accept", "new-state"];
    let v = live(&p, case.checks).0;
    let (ok, m) = suture_json(&["inspect", p.work.path("fix.suture").to_str().unwrap()]);
    assert!(ok, "{m}");
    assert_eq!(m["manifest"]["accepted"], serde_json::json!(["new-state"]));
    v
}

/// Starts the project's deployed `app`, checks the answers before, builds and applies the
/// patch, checks the answers after; returns the build's report and the patched program.
fn live(p: &Project, checks: &[(&str, &str, &str)]) -> (serde_json::Value, Target) {
    let deployed = p.work.path("src/app");
    let mut t = Target::start(&deployed, None);
    for (input, before, _) in checks {
        assert_eq!(t.ask(input), *before, "before the fix, {input:?}");
    }
    let out = p.build(&deployed, "app", "fix.suture");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(out.status.success(), "build failed: {}{}", stderr(&out), v);
    let bundle = p.work.path("fix.suture");
    let (ok, a) = apply_to(&bundle, t.pid, &p.public);
    assert!(ok, "apply failed: {a}");
    for (input, _, after) in checks {
        assert_eq!(t.ask(input), *after, "after the fix, {input:?}");
    }
    assert!(t.alive());
    (v, t)
}

/// The fix must be refused with reason code `code` and `reason` in the message, and no
/// bundle written.
fn refused(files: &[(&str, &str)], fixed: &[(&str, &str)], code: &str, reason: &str) {
    let p = Project::new(files, fixed, None, None);
    assert_refused(&p, code, reason);
}

/// A refusal in `--json`: kind `refused`, the reason code, exit code 3, no bundle.
fn assert_refused(p: &Project, code: &str, reason: &str) {
    let out = p.build(&p.work.path("src/app"), "app", "fix.suture");
    assert_eq!(
        out.status.code(),
        Some(3),
        "a refusal exits with 3: {}{}",
        stderr(&out),
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "refused", "{v}");
    assert_eq!(v["reason"], code, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains(reason), "expected {reason:?} in {msg:?}");
    assert!(
        !p.work.path("fix.suture").exists(),
        "no bundle may be written"
    );
}

const NOT_LIVE: &str = "a normal update and a restart are needed";

#[test]
fn changed_exported_function_and_new_string_literal() {
    let v = patch_live(&Case {
        files: &[("lib.c", "#include <string.h>\nconst char *answer(const char *in) { return strcmp(in, \"ping\") == 0 ? \"pong\" : \"?\"; }\n")],
        fixed: &[("lib.c", "#include <string.h>\nconst char *answer(const char *in) { return strcmp(in, \"ping\") == 0 ? \"PONG (fixed)\" : \"?\"; }\n")],
        checks: &[("ping", "pong", "PONG (fixed)"), ("x", "?", "?")],
    });
    assert_eq!(v["summary"]["changed"][0], "answer (lib.c)");
}

#[test]
fn changed_static_function() {
    let lib = |k: &str| {
        format!("#include <stdio.h>\n#include <string.h>\nstatic __attribute__((noinline)) int score(const char *s) {{ return (int)strlen(s) * {k}; }}\nconst char *answer(const char *in) {{ static char b[32]; snprintf(b, sizeof b, \"%d\", score(in)); return b; }}\n")
    };
    let (a, b) = (lib("1"), lib("2"));
    let v = patch_live(&Case {
        files: &[("lib.c", &a)],
        fixed: &[("lib.c", &b)],
        checks: &[("abc", "3", "6")],
    });
    assert_eq!(v["summary"]["changed"].as_array().unwrap().len(), 1, "{v}");
}

#[test]
fn function_inlined_into_its_caller() {
    let lib = |k: &str| {
        format!("#include <stdio.h>\n#include <string.h>\nstatic inline int bonus(int x) {{ return x + {k}; }}\nconst char *answer(const char *in) {{ static char b[32]; snprintf(b, sizeof b, \"%d\", bonus((int)strlen(in))); return b; }}\n")
    };
    let (a, b) = (lib("1"), lib("100"));
    let v = patch_live(&Case {
        files: &[("lib.c", &a)],
        fixed: &[("lib.c", &b)],
        checks: &[("ab", "3", "102")],
    });
    // `bonus` changed in the diff; `answer` changed only because it inlines it.
    assert_eq!(
        v["summary"]["pulled_in"],
        serde_json::json!(["answer (lib.c)"]),
        "{v}"
    );
}

#[test]
fn new_helper_and_new_globals() {
    let before = "#include <string.h>\nconst char *answer(const char *in) { return strlen(in) > 4 ? \"long\" : \"short\"; }\n";
    let after = "#include <stdio.h>\n#include <string.h>\nint rejected;\nstatic int seen = 40;\nstatic __attribute__((noinline)) int too_long(const char *s) { return strlen(s) > 4; }\nconst char *answer(const char *in) {\n  static char b[64];\n  seen++;\n  if (too_long(in)) rejected++;\n  snprintf(b, sizeof b, \"%s %d %d\", too_long(in) ? \"long\" : \"short\", rejected, seen);\n  return b;\n}\n";
    let v = patch_live_accepting_new_state(
        &Case {
            files: &[("lib.c", before)],
            fixed: &[("lib.c", after)],
            checks: &[
                ("abcdef", "long", "long 1 41"),
                ("ab", "short", "short 1 42"),
            ],
        },
        &["rejected (lib.c)", "seen (lib.c)"],
    );
    let s = &v["summary"];
    assert!(s["new_functions"].to_string().contains("too_long"), "{s}");
    assert!(s["new_data"].to_string().contains("rejected"), "{s}");
}

#[test]
fn fix_that_uses_library_data_the_program_never_used() {
    // The deployed PIE never referenced `stderr`, so it has no copy of it: the fix reaches
    // libc's, which lies far beyond a direct 32-bit reference from patch memory.
    let a = "#include <string.h>\nconst char *answer(const char *in) { return strlen(in) > 3 ? \"big\" : \"small\"; }\n";
    let b = "#include <stdio.h>\n#include <string.h>\nconst char *answer(const char *in) { if (!*in || strchr(in, '%')) { fputs(\"suture test: rejected input\\n\", stderr); return \"rejected\"; } return strlen(in) > 3 ? \"big\" : \"small\"; }\n";
    patch_live(&Case {
        files: &[("lib.c", a)],
        fixed: &[("lib.c", b)],
        checks: &[("a%n", "small", "rejected"), ("abcd", "big", "big")],
    });
}

#[test]
fn changed_switch_with_a_jump_table() {
    let lib = |x: &str| {
        format!("const char *answer(const char *in) {{\n switch (in[0]) {{\n case 'a': return \"A\"; case 'b': return \"B\"; case 'c': return \"{x}\"; case 'd': return \"D\";\n case 'e': return \"E\"; case 'f': return \"F\"; case 'g': return \"G\"; case 'h': return \"H\";\n default: return \"-\";\n }}\n}}\n")
    };
    let (a, b) = (lib("C"), lib("C!"));
    patch_live(&Case {
        files: &[("lib.c", &a)],
        fixed: &[("lib.c", &b)],
        checks: &[("c", "C", "C!"), ("h", "H", "H"), ("z", "-", "-")],
    });
}

#[test]
fn change_across_two_files() {
    let lib = "#include <stdio.h>\nint weight(const char *s);\nconst char *answer(const char *in) { static char b[32]; snprintf(b, sizeof b, \"w=%d\", weight(in)); return b; }\n";
    let lib_fixed = "#include <stdio.h>\nint weight(const char *s);\nint extra(void);\nconst char *answer(const char *in) { static char b[32]; snprintf(b, sizeof b, \"w=%d+%d\", weight(in), extra()); return b; }\n";
    let two = "#include <string.h>\nint weight(const char *s) { return (int)strlen(s); }\n";
    let two_fixed = "#include <string.h>\nint weight(const char *s) { return (int)strlen(s) * 10; }\nint extra(void) { return 7; }\n";
    patch_live(&Case {
        files: &[("lib.c", lib), ("two.c", two)],
        fixed: &[("lib.c", lib_fixed), ("two.c", two_fixed)],
        checks: &[("abc", "w=3", "w=30+7")],
    });
}

#[test]
fn fix_that_adds_a_source_file() {
    // The fix moves validation into a new file; the changed function calls into it.
    let a = "#include <string.h>\nconst char *answer(const char *in) { return strlen(in) > 3 ? \"accepted\" : \"short\"; }\n";
    let b = "#include <string.h>\nint is_safe(const char *in);\nconst char *answer(const char *in) { if (!is_safe(in)) return \"rejected\"; return strlen(in) > 3 ? \"accepted\" : \"short\"; }\n";
    let checker = "#include <string.h>\nstatic int bad_char(char c) { return c == '<' || c == '>'; }\nint checked;\nint is_safe(const char *in) { checked++; for (; *in; in++) if (bad_char(*in)) return 0; return 1; }\n";
    let v = patch_live_accepting_new_state(
        &Case {
            files: &[("lib.c", a)],
            fixed: &[("lib.c", b), ("check.c", checker)],
            checks: &[
                ("<script>", "accepted", "rejected"),
                ("hello", "accepted", "accepted"),
                ("hi", "short", "short"),
            ],
        },
        &["checked (check.c)"],
    );
    let s = &v["summary"];
    assert_eq!(s["changed"], serde_json::json!(["answer (lib.c)"]), "{v}");
    assert!(
        s["new_functions"].to_string().contains("is_safe (check.c)"),
        "{v}"
    );
    assert!(
        s["new_data"].to_string().contains("checked (check.c)"),
        "{v}"
    );
}

#[test]
fn constprop_clone() {
    let lib = |k: &str| {
        format!("#include <stdio.h>\n#include <string.h>\nstatic __attribute__((noinline)) int scale(int x, int k) {{ int r = 0; for (int i = 0; i < k; i++) r += x ^ i; return r{k}; }}\nconst char *answer(const char *in) {{ static char b[32]; snprintf(b, sizeof b, \"%d\", scale((int)strlen(in), 3)); return b; }}\n")
    };
    let (a, b) = (lib(""), lib(" + 1"));
    let v = patch_live(&Case {
        files: &[("lib.c", &a)],
        fixed: &[("lib.c", &b)],
        checks: &[("ab", "5", "6")], // (2^0)+(2^1)+(2^2) = 5
    });
    assert!(
        v["summary"]["changed"]
            .to_string()
            .contains("scale.constprop"),
        "{v}"
    );
}

#[test]
fn functions_that_only_record_moved_line_numbers_are_kept_as_they_run() {
    // `answer` records __LINE__ below the fix: its code changes, its behaviour does not.
    // `limited` changes through a macro constant: it must be replaced.
    let f = |limit: &str, validate: &str| {
        format!(
            "#include <stdio.h>\n#include <string.h>\n#define LIMIT {limit}\nstatic char buf[64];\nint last_line;\n#define TRACE() (last_line = __LINE__)\n__attribute__((noinline)) int limited(int n) {{ return n > LIMIT ? LIMIT : n; }}\n__attribute__((noinline)) int validate(const char *in) {{\n{validate}\n}}\nconst char *answer(const char *in) {{\n  TRACE();\n  snprintf(buf, sizeof buf, \"%d %d %d\", validate(in), limited((int)strlen(in)), last_line > 0);\n  return buf;\n}}\n"
        )
    };
    let a = f("10", "  return strlen(in) < 4;");
    let b = f(
        "50",
        "  /* names starting with 'a' are reserved */\n  if (in[0] == 'a')\n    return 0;\n  return strlen(in) < 4;",
    );
    let long = "z".repeat(24);
    let v = patch_live(&Case {
        files: &[("lib.c", &a)],
        fixed: &[("lib.c", &b)],
        checks: &[("ab", "1 2 1", "0 2 1"), (&long, "0 10 1", "0 24 1")],
    });
    let s = &v["summary"];
    assert_eq!(s["changed"], serde_json::json!(["validate (lib.c)"]), "{v}");
    assert_eq!(
        s["pulled_in"],
        serde_json::json!(["limited (lib.c)"]),
        "{v}"
    );
    assert_eq!(
        s["line_numbers_only"],
        serde_json::json!(["answer (lib.c)"]),
        "{v}"
    );
}

#[test]
fn line_moves_only_produce_no_bundle() {
    let a = "#include <string.h>\nconst char *answer(const char *in) { return strlen(in) ? \"yes\" : \"no\"; }\n";
    let b = "#include <string.h>\n\n\n/* moved down */\n\nconst char *answer(const char *in) { return strlen(in) ? \"yes\" : \"no\"; }\n";
    refused(
        &[("lib.c", a)],
        &[("lib.c", b)],
        "no-code-change",
        "nothing to patch",
    );
}

#[test]
fn changed_initial_value_of_existing_data_is_refused() {
    let f = |v: &str| {
        format!("#include <stdio.h>\nint limit = {v};\nconst char *answer(const char *in) {{ static char b[16]; snprintf(b, sizeof b, \"%d\", limit + in[0]); return b; }}\n")
    };
    let (a, b) = (f("8"), f("9"));
    refused(&[("lib.c", &a)], &[("lib.c", &b)], "data-init", NOT_LIVE);
    refused(
        &[("lib.c", &a)],
        &[("lib.c", &b)],
        "data-init",
        "initial value of existing data `limit`",
    );
}

#[test]
fn changed_size_of_existing_data_is_refused() {
    let f = |n: &str| {
        format!("#include <stdio.h>\nint table[{n}];\nconst char *answer(const char *in) {{ static char b[16]; table[0]++; snprintf(b, sizeof b, \"%d%c\", table[0], in[0]); return b; }}\n")
    };
    let (a, b) = (f("4"), f("8"));
    refused(
        &[("lib.c", &a)],
        &[("lib.c", &b)],
        "data-init",
        "size of existing data `table`",
    );
}

#[test]
fn changed_struct_layout_used_by_existing_data_is_refused() {
    // Same size, members swapped: sessions already on the heap keep the old order.
    let f = |fields: &str| {
        format!("#include <stdio.h>\n#include <stdlib.h>\nstruct session {{ {fields} }};\nstatic struct session *current;\nconst char *answer(const char *in) {{ static char b[32]; if (!current) {{ current = calloc(1, sizeof *current); current->limit = 3; }} current->hits++; snprintf(b, sizeof b, \"%d/%d%c\", current->hits, current->limit, in[0]); return b; }}\n")
    };
    let (a, b) = (f("int hits; int limit;"), f("int limit; int hits;"));
    refused(&[("lib.c", &a)], &[("lib.c", &b)], "layout", NOT_LIVE);
    refused(
        &[("lib.c", &a)],
        &[("lib.c", &b)],
        "layout",
        "layout of `struct session` changed (member `hits` moved from offset 0 to 4",
    );
}

#[test]
fn struct_used_only_by_value_on_the_stack_may_change() {
    let a = "#include <stdio.h>\nstruct pair { int a; int b; };\nconst char *answer(const char *in) { static char buf[32]; struct pair p = { in[0], 2 }; snprintf(buf, sizeof buf, \"%d\", p.a - p.b); return buf; }\n";
    let b = "#include <stdio.h>\nstruct pair { long c; int b; int a; };\nconst char *answer(const char *in) { static char buf[32]; struct pair p = { .a = in[0], .b = 2, .c = 100 }; snprintf(buf, sizeof buf, \"%ld\", p.a + p.b + p.c); return buf; }\n";
    patch_live(&Case {
        files: &[("lib.c", a)],
        fixed: &[("lib.c", b)],
        checks: &[("A", "63", "167")],
    });
}

#[test]
fn changed_thread_local_is_refused() {
    let f = |v: &str| {
        format!("#include <stdio.h>\n__thread int tl = {v};\nconst char *answer(const char *in) {{ static char b[16]; snprintf(b, sizeof b, \"%d%c\", tl++, in[0]); return b; }}\n")
    };
    let (a, b) = (f("1"), f("2"));
    refused(
        &[("lib.c", &a)],
        &[("lib.c", &b)],
        "tls",
        "thread-local variable `tl`",
    );
}

#[test]
fn changed_constructor_is_refused() {
    let f = |v: &str| {
        format!("static int ready;\n__attribute__((constructor)) static void init(void) {{ ready = {v}; }}\nconst char *answer(const char *in) {{ return ready && in[0] ? \"up\" : \"down\"; }}\n")
    };
    let (a, b) = (f("1"), f("2"));
    refused(
        &[("lib.c", &a)],
        &[("lib.c", &b)],
        "constructor",
        "constructor or destructor `init` changed",
    );
}

#[test]
fn function_too_short_for_a_detour_is_refused() {
    let f = |v: &str| {
        format!("__attribute__((noinline)) int flag(void) {{ return {v}; }}\nconst char *answer(const char *in) {{ return flag() && in ? \"on\" : \"off\"; }}\n")
    };
    let (a, b) = (f("0"), f("1"));
    refused(
        &[("lib.c", &a)],
        &[("lib.c", &b)],
        "too-short",
        "shorter than the 5-byte detour",
    );
}

#[test]
fn fix_in_a_shared_library_used_by_a_running_program() {
    let makefile = "CFLAGS ?= -O2 -g\nall: app\nlibcalc.so: calc.o\n\t$(CC) -shared -o libcalc.so calc.o\ncalc.o: calc.c\n\t$(CC) $(CFLAGS) -fPIC -c calc.c -o calc.o\napp: main.o libcalc.so\n\t$(CC) $(CFLAGS) -o app main.o -L. -lcalc\nmain.o: main.c\n\t$(CC) $(CFLAGS) -c main.c -o main.o\n";
    let calc = |op: &str| {
        format!("#include <stdio.h>\n#include <string.h>\nstatic int calls;\nconst char *answer(const char *in) {{ static char b[32]; calls++; snprintf(b, sizeof b, \"%d/%d\", (int)strlen(in) {op} 2, calls); return b; }}\n")
    };
    let (a, b) = (calc("+"), calc("*"));
    let p = Project::new(&[("calc.c", &a)], &[("calc.c", &b)], None, Some(makefile));
    let src = p.work.path("src");
    let mut t = Target::start(&src.join("app"), Some(&src));
    assert_eq!(t.ask("abc"), "5/1");
    let out = p.build(&src.join("libcalc.so"), "libcalc.so", "fix.suture");
    assert!(out.status.success(), "{}", stderr(&out));
    let bundle = p.work.path("fix.suture");
    let (ok, v) = apply_to(&bundle, t.pid, &p.public);
    assert!(ok, "{v}");
    assert_eq!(
        t.ask("abc"),
        "6/2",
        "the library's static counter carried on"
    );
}

#[test]
fn meson_project_with_a_shared_library() {
    // Meson pins the compiler in its configured build folder: the copies get a fresh one.
    let meson = "project('svc', 'c', default_options: ['buildtype=release', 'debug=true'])\nlib = shared_library('answer', 'lib.c')\nexecutable('app', 'main.c', link_with: lib)\n";
    let makefile = "all:\n\tmeson setup build >/dev/null && ninja -C build >/dev/null\n";
    let p = Project::new(
        &[("meson.build", meson), ("lib.c", SIMPLE)],
        &[("lib.c", SIMPLE_FIXED)],
        None,
        Some(makefile),
    );
    let build = p.work.path("src/build");
    let mut t = Target::start(&build.join("app"), None);
    assert_eq!(t.ask("abcdef"), "big");
    let out = p.build(
        &build.join("libanswer.so"),
        "build/libanswer.so",
        "fix.suture",
    );
    assert!(
        out.status.success(),
        "{}{}",
        stderr(&out),
        String::from_utf8_lossy(&out.stdout)
    );
    let (ok, v) = apply_to(&p.work.path("fix.suture"), t.pid, &p.public);
    assert!(ok, "{v}");
    assert_eq!(t.ask("abcdef"), "BIG");
}

const CXX_MAKEFILE: &str = "CFLAGS ?= -O2 -g\nCXXFLAGS ?= -O2 -g\napp: main.o lib.o\n\t$(CXX) $(CXXFLAGS) -o app main.o lib.o\nmain.o: main.c\n\t$(CC) $(CFLAGS) -c main.c -o main.o\nlib.o: lib.cpp\n\t$(CXX) $(CXXFLAGS) -c lib.cpp -o lib.o\n";

#[test]
fn cxx_member_function() {
    let lib = |k: &str| {
        format!("#include <cstdio>\n#include <cstring>\nclass Meter {{\n  int total = 0;\npublic:\n  int add(const char *s);\n}};\n__attribute__((noinline)) int Meter::add(const char *s) {{ total += (int)strlen(s){k}; return total; }}\nstatic Meter meter;\nextern \"C\" const char *answer(const char *in) {{ static char b[32]; snprintf(b, sizeof b, \"%d\", meter.add(in)); return b; }}\n")
    };
    let (a, b) = (lib(""), lib(" * 10"));
    let p = Project::new(
        &[("lib.cpp", &a)],
        &[("lib.cpp", &b)],
        None,
        Some(CXX_MAKEFILE),
    );
    let app = p.work.path("src/app");
    let mut t = Target::start(&app, None);
    assert_eq!(t.ask("ab"), "2");
    let out = p.build(&app, "app", "fix.suture");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(out.status.success(), "{}{v}", stderr(&out));
    assert!(
        v["summary"]["changed"]
            .to_string()
            .contains("_ZN5Meter3addEPKc"),
        "{v}"
    );
    let bundle = p.work.path("fix.suture");
    let (ok, a) = apply_to(&bundle, t.pid, &p.public);
    assert!(ok, "{a}");
    assert_eq!(t.ask("ab"), "22", "the object's member state carried on");
}

/// A C++ port parser: `parse_port` throws on bad input, `handle` catches; `check` is added to
/// `parse_port` and `catch` to `handle`'s handlers.
fn port_parser(check: &str, catch: &str) -> String {
    format!("#include <cstdio>\n#include <cstdlib>\n#include <stdexcept>\n__attribute__((noinline)) int parse_port(const char *s) {{\n  int v = atoi(s);\n  if (v <= 0) throw std::invalid_argument(\"bad port\");\n{check}  return v;\n}}\n__attribute__((noinline)) int handle(const char *s) {{\n  try {{ return parse_port(s); }}{catch} catch (const std::exception &e) {{ return -1; }}\n}}\nextern \"C\" const char *answer(const char *in) {{ static char b[32]; snprintf(b, sizeof b, \"%d\", handle(in)); return b; }}\n")
}

const PORT_CHECK: &str = "  if (v > 65535) throw std::out_of_range(\"port out of range\");\n";

/// The fix throws from the replaced function; `handle` (not replaced) catches. Without the
/// patch's unwind tables registered, the unwinder cannot leave patch code: terminate. Revert
/// takes the tables out of the unwinder before unmapping them: exceptions in the original
/// code still unwind.
fn exceptions_cross_from_patch_code(makefile: &str) {
    let p = Project::new(
        &[("lib.cpp", &port_parser("", ""))],
        &[("lib.cpp", &port_parser(PORT_CHECK, ""))],
        None,
        Some(makefile),
    );
    let (_, mut t) = live(
        &p,
        &[
            ("443", "443", "443"),
            ("70000", "70000", "-1"),
            ("0", "-1", "-1"),
            ("x", "-1", "-1"),
        ],
    );
    let (ok, r) = suture_json(&["revert", "--pid", &t.pid_arg()]);
    assert!(ok, "{r}");
    assert_eq!(t.ask("70000"), "70000");
    assert_eq!(t.ask("0"), "-1");
    assert!(t.alive());
}

#[test]
fn cxx_exceptions_thrown_in_patch_code_are_caught_by_running_callers() {
    exceptions_cross_from_patch_code(CXX_MAKEFILE);
}

#[test]
fn cxx_exceptions_in_a_static_executable() {
    // No libgcc_s: the unwinder is linked into the executable and exported nowhere.
    exceptions_cross_from_patch_code(
        &CXX_MAKEFILE.replace("-o app main.o", "-static -o app main.o"),
    );
}

#[test]
fn cxx_fix_that_catches_a_new_exception_type() {
    // The deployed program never caught std::out_of_range: the patch brings the exception
    // table entry and its typeinfo reference (a DW.ref the module does not have).
    let p = Project::new(
        &[("lib.cpp", &port_parser("", ""))],
        &[(
            "lib.cpp",
            &port_parser(
                PORT_CHECK,
                " catch (const std::out_of_range &e) { return -2; }",
            ),
        )],
        None,
        Some(CXX_MAKEFILE),
    );
    live(
        &p,
        &[
            ("443", "443", "443"),
            ("70000", "70000", "-2"),
            ("0", "-1", "-1"),
        ],
    );
}

#[test]
fn cxx_function_using_std_string() {
    let lib = |bang: &str| {
        format!("#include <string>\nstatic std::string last;\n__attribute__((noinline)) std::string shout(const std::string &s) {{ return s + \"{bang}\"; }}\nextern \"C\" const char *answer(const char *in) {{ last = shout(in); return last.c_str(); }}\n")
    };
    let (a, b) = (lib("!"), lib("?!"));
    let p = Project::new(
        &[("lib.cpp", &a)],
        &[("lib.cpp", &b)],
        None,
        Some(CXX_MAKEFILE),
    );
    let app = p.work.path("src/app");
    let mut t = Target::start(&app, None);
    assert_eq!(t.ask("hey"), "hey!");
    let out = p.build(&app, "app", "fix.suture");
    assert!(
        out.status.success(),
        "{}{}",
        stderr(&out),
        String::from_utf8_lossy(&out.stdout)
    );
    let bundle = p.work.path("fix.suture");
    let (ok, a) = apply_to(&bundle, t.pid, &p.public);
    assert!(ok, "{a}");
    assert_eq!(t.ask("hey"), "hey?!");
    assert_eq!(t.ask("you"), "you?!");
}

const SIMPLE: &str = "#include <string.h>\nconst char *answer(const char *in) { return strlen(in) > 3 ? \"big\" : \"small\"; }\n";
const SIMPLE_FIXED: &str = "#include <string.h>\nconst char *answer(const char *in) { return strlen(in) > 3 ? \"BIG\" : \"small\"; }\n";

fn apply_and_check(p: &Project, deployed: &Path, artifact: &str) {
    let mut t = Target::start(deployed, None);
    assert_eq!(t.ask("abcdef"), "big");
    let out = p.build(deployed, artifact, "fix.suture");
    assert!(
        out.status.success(),
        "{}{}",
        stderr(&out),
        String::from_utf8_lossy(&out.stdout)
    );
    let bundle = p.work.path("fix.suture");
    let (ok, v) = apply_to(&bundle, t.pid, &p.public);
    assert!(ok, "{v}");
    assert_eq!(t.ask("abcdef"), "BIG");
}

#[test]
fn stripped_deployed_binary_uses_the_rebuilt_symbol_table() {
    let p = Project::new(&[("lib.c", SIMPLE)], &[("lib.c", SIMPLE_FIXED)], None, None);
    let deployed = p.work.path("app-stripped");
    std::fs::copy(p.work.path("src/app"), &deployed).unwrap();
    assert!(Command::new("strip")
        .arg(&deployed)
        .status()
        .unwrap()
        .success());
    apply_and_check(&p, &deployed, "app");
}

#[test]
fn build_that_compiles_and_links_in_one_call() {
    let makefile = "app: main.c lib.c\n\t$(CC) -O2 -g -o app main.c lib.c\n";
    let p = Project::new(
        &[("lib.c", SIMPLE)],
        &[("lib.c", SIMPLE_FIXED)],
        None,
        Some(makefile),
    );
    let deployed = p.work.path("src/app");
    apply_and_check(&p, &deployed, "app");
}

#[test]
fn data_the_deployed_link_discarded_is_carried_by_the_patch() {
    // `spare_limit` is in the object but unused, so --gc-sections left it out of the deployed
    // binary; the fix uses it: the patch brings a copy with its initial value.
    let makefile = "CFLAGS = -O2 -g -ffunction-sections -fdata-sections\napp: main.o lib.o\n\t$(CC) -o app main.o lib.o -Wl,--gc-sections\n%.o: %.c\n\t$(CC) $(CFLAGS) -c $< -o $@\n";
    let f = |limit: &str| {
        format!("#include <string.h>\nint spare_limit = 7;\nconst char *answer(const char *in) {{ return strlen(in) > {limit} ? \"long\" : \"short\"; }}\n")
    };
    let mut p = Project::new(
        &[("lib.c", &f("3"))],
        &[("lib.c", &f("(size_t)spare_limit"))],
        None,
        Some(makefile),
    );
    // The process never had it: the copy is new state.
    assert_refused(&p, "new-state", "spare_limit (lib.c)");
    p.extra = vec!["--accept", "new-state"];
    let nm = Command::new("nm")
        .arg(p.work.path("src/app"))
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&nm.stdout).contains("spare_limit"),
        "the deployed link should have discarded spare_limit"
    );
    live(
        &p,
        &[("abcde", "long", "short"), ("abcdefgh", "long", "long")],
    );
}

#[test]
fn a_failing_build_says_why_and_keeps_its_log() {
    let p = Project::new(&[("lib.c", SIMPLE)], &[("lib.c", SIMPLE_FIXED)], None, None);
    let out = suture(&[
        "--json",
        "build",
        "--source",
        p.work.path("src").to_str().unwrap(),
        "--diff",
        p.work.path("fix.diff").to_str().unwrap(),
        "--target",
        p.work.path("src/app").to_str().unwrap(),
        "--build-cmd",
        "echo compiling; echo 'fatal: libfoo.h: No such file' >&2; exit 3",
        "--key",
        p.key.to_str().unwrap(),
        "--out",
        p.work.path("fix.suture").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "a tool failure exits with 1");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "error", "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains("build command failed"), "{msg}");
    assert!(msg.contains("fatal: libfoo.h: No such file"), "{msg}");
    let log = msg
        .rsplit("whole output: ")
        .next()
        .unwrap()
        .trim_end_matches(')');
    let kept = std::fs::read_to_string(log).expect("the log named in the error exists");
    assert!(kept.contains("compiling"));
    std::fs::remove_dir_all(Path::new(log).parent().unwrap()).unwrap();
    assert!(!p.work.path("fix.suture").exists());
}

#[test]
fn stale_build_outputs_in_the_source_are_never_reused() {
    let p = Project::new(&[("lib.c", SIMPLE)], &[("lib.c", SIMPLE_FIXED)], None, None);
    // An object from some other build, newer than its source: make would keep it.
    let src = p.work.path("src");
    let other = p.work.path("other.c");
    std::fs::write(
        &other,
        "const char *answer(const char *in) { return in; }\n",
    )
    .unwrap();
    p.work.gcc(&[
        "-O2",
        "-c",
        other.to_str().unwrap(),
        "-o",
        src.join("lib.o").to_str().unwrap(),
    ]);
    let deployed = p.work.path("app-deployed");
    std::fs::copy(p.work.path("src/app"), &deployed).unwrap();
    apply_and_check(&p, &deployed, "app");
}

#[test]
fn difference_only_in_debug_info_does_not_stop_a_patch() {
    // Deployed from another folder: -g records another build directory (and the build-id
    // changes), the code does not.
    let p = Project::new(&[("lib.c", SIMPLE)], &[("lib.c", SIMPLE_FIXED)], None, None);
    let elsewhere = p.work.path("built-elsewhere");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(p.work.path("src"))
        .arg(&elsewhere)
        .status()
        .unwrap()
        .success());
    assert!(Command::new("make")
        .args(["-s", "-B"])
        .current_dir(&elsewhere)
        .status()
        .unwrap()
        .success());
    let deployed = elsewhere.join("app");
    let id = |f: &Path| suture_module_build_id(f);
    assert_ne!(
        id(&deployed),
        id(&p.work.path("src/app")),
        "debug info differs"
    );
    apply_and_check(&p, &deployed, "app");
}

fn suture_module_build_id(f: &Path) -> String {
    let out = Command::new("readelf").arg("-n").arg(f).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: ").map(str::to_string))
        .unwrap()
}

#[test]
fn a_real_code_difference_from_the_deployed_binary_is_refused() {
    let p = Project::new(&[("lib.c", SIMPLE)], &[("lib.c", SIMPLE_FIXED)], None, None);
    // The deployed binary was built with other flags than the source's build command uses.
    let other = p.work.path("other-flags");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(p.work.path("src"))
        .arg(&other)
        .status()
        .unwrap()
        .success());
    assert!(Command::new("make")
        .args(["-s", "-B", "CFLAGS=-O0"])
        .current_dir(&other)
        .status()
        .unwrap()
        .success());
    let out = p.build(&other.join("app"), "app", "fix.suture");
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("the source or toolchain differs"),
        "{v}"
    );
    assert!(!p.work.path("fix.suture").exists());
}

#[test]
fn changed_main_loop_is_built_but_refused_as_busy_while_it_runs() {
    let main = |greeting: &str| {
        MAIN_C.replace(
            "printf(\"%s\\n\", answer(line));",
            &format!("printf(\"{greeting}%s\\n\", answer(line));"),
        )
    };
    let (a, b) = (main(""), main("> "));
    assert_ne!(a, b);
    let p = Project::new(&[("lib.c", SIMPLE)], &[("main.c", &b)], Some(&a), None);
    let app = p.work.path("src/app");
    let mut t = Target::start(&app, None);
    let out = p.build(&app, "app", "fix.suture");
    assert!(out.status.success(), "{}", stderr(&out));
    let bundle = p.work.path("fix.suture");
    let before = snapshot(t.pid);
    let (ok, v) = apply_within(&bundle, t.pid, &p.public, 300);
    assert!(!ok);
    assert_eq!(v["kind"], "busy", "{v}");
    assert!(v["error"].as_str().unwrap().contains("`main`"), "{v}");
    assert_same_memory(&before, &snapshot(t.pid));
    assert_eq!(t.ask("abcdef"), "big");
}

// ---------------------------------------------------------------------------------------
// Real-world patchability: what stopped `suture build` on Debian security fixes.

/// Answers `"<a_score> <b_score>"` for the input's length; `a/util.c` and `b/util.c` are two
/// files of one name, each with an `assert` (a `__PRETTY_FUNCTION__.N` of the same number).
const UTIL_MAIN: &str = "#include <stdio.h>\n#include <string.h>\nint a_score(int n);\nint b_score(int n);\nconst char *answer(const char *in) { static char b[64]; int n = (int)strlen(in); snprintf(b, sizeof b, \"%d %d\", a_score(n), b_score(n)); return b; }\n";
const UTIL_MAKEFILE: &str = "CFLAGS ?= -O2 -g\napp: main.o lib.o a/util.o b/util.o\n\t$(CC) $(CFLAGS) -o app $^\n%.o: %.c\n\t$(CC) $(CFLAGS) -c $< -o $@\n";

#[test]
fn real_world_two_files_named_util_c_each_with_an_assert() {
    let a = "#include <assert.h>\n__attribute__((noinline)) int a_score(int n) { assert(n >= 0); return n * 2; }\n__attribute__((noinline)) int a_other(int n) { assert(n < 100000); return n + 1; }\n";
    let b = "#include <assert.h>\n__attribute__((noinline)) int b_score(int n) { assert(n >= 0); return n * 3; }\n";
    // The fix adds a function with its own assert above `b_score`: gcc's numbers shift.
    let b_fixed = "#include <assert.h>\n__attribute__((noinline)) int b_limit(int n) { assert(n != 12345); return n > 5 ? 5 : n; }\n__attribute__((noinline)) int b_score(int n) { assert(n >= 0); return b_limit(n) * 30; }\n";
    let p = Project::new(
        &[("lib.c", UTIL_MAIN), ("a/util.c", a), ("b/util.c", b)],
        &[("b/util.c", b_fixed)],
        None,
        Some(UTIL_MAKEFILE),
    );
    let (v, _t) = live(
        &p,
        &[("abc", "6 9", "6 90"), ("abcdefgh", "16 24", "16 150")],
    );
    let s = &v["summary"];
    assert_eq!(s["changed"], serde_json::json!(["b_score (util.c)"]), "{v}");
    assert!(s["new_functions"].to_string().contains("b_limit"), "{v}");
    // b_limit's own __PRETTY_FUNCTION__ is new data; b_score's is the deployed one.
    assert!(
        s["new_data"]
            .to_string()
            .contains("__PRETTY_FUNCTION__=b_limit"),
        "{v}"
    );
}

#[test]
fn real_world_static_const_char_module_in_every_function() {
    // libtiff's pattern, plus a function-local counter whose state must carry on.
    let f = |extra: &str, sep: &str| {
        format!("#include <stdio.h>\n#include <string.h>\n{extra}__attribute__((noinline)) const char *first(int n) {{ static const char module[] = \"first\"; static int calls; static char b[64]; calls++; snprintf(b, sizeof b, \"%s{sep}%d#%d\", module, n, calls); return b; }}\n__attribute__((noinline)) const char *second(int n) {{ static const char module[] = \"second\"; static char b[64]; snprintf(b, sizeof b, \"%s:%d\", module, n); return b; }}\nconst char *answer(const char *in) {{ int n = (int)strlen(in); return n > 3 ? first(n) : second(n); }}\n")
    };
    let a = f("", ":");
    // The fix adds a function with a `module` of its own before the others, and changes
    // `first`: every `module.N` and `calls.N` is renumbered.
    let b = f(
        "__attribute__((noinline)) int zero(int n) { static const char module[] = \"zero\"; static int seen; seen += n; return seen + (int)sizeof module; }\n",
        "=",
    );
    let p = Project::new(&[("lib.c", &a)], &[("lib.c", &b)], None, None);
    let (v, mut t) = live(
        &p,
        &[
            ("abcd", "first:4#1", "first=4#2"),
            ("ab", "second:2", "second:2"),
        ],
    );
    assert_eq!(
        v["summary"]["changed"],
        serde_json::json!(["first (lib.c)"]),
        "{v}"
    );
    assert_eq!(
        t.ask("abcde"),
        "first=5#3",
        "the deployed counter carried on"
    );
}

#[test]
fn real_world_exported_function_with_an_internal_alias() {
    // libxml2's pattern: the code is defined under a hidden `__internal_alias` name that
    // the library's own callers use, and exported under the public name as an alias.
    let f = |big: &str| {
        format!("#include <string.h>\n__attribute__((visibility(\"hidden\"))) const char *answer__internal_alias(const char *in) {{ return strlen(in) > 3 ? \"{big}\" : \"small\"; }}\nextern __typeof(answer__internal_alias) answer __attribute__((alias(\"answer__internal_alias\")));\n__attribute__((noinline)) const char *twice(const char *in) {{ return answer__internal_alias(in); }}\n")
    };
    let p = Project::new(&[("lib.c", &f("big"))], &[("lib.c", &f("BIG"))], None, None);
    let (v, _t) = live(&p, &[("abcdef", "big", "BIG"), ("ab", "small", "small")]);
    assert_eq!(
        v["summary"]["changed"],
        serde_json::json!(["answer (lib.c)"]),
        "{v}"
    );
    let (ok, m) = suture_json(&["inspect", p.work.path("fix.suture").to_str().unwrap()]);
    assert!(ok, "{m}");
    let functions = m["manifest"]["functions"].as_array().unwrap();
    let answer = functions
        .iter()
        .filter(|f| f["symbol"].as_str().unwrap().starts_with("answer"))
        .count();
    assert_eq!(answer, 1, "one function, one entry: {m}");
    let mut addresses: Vec<u64> = functions
        .iter()
        .map(|f| f["address"].as_u64().unwrap())
        .collect();
    addresses.dedup();
    assert_eq!(addresses.len(), functions.len(), "{m}");
}

#[test]
fn real_world_build_that_strips_at_link_time() {
    // `-s` in the package's own LDFLAGS, and `install -s`: the deployed binary has no symbol
    // table, the builds Suture compares keep theirs.
    let makefile = "CFLAGS ?= -O2 -g\nLDFLAGS = -s -Wl,-z,relro,--strip-all\napp: app.tmp\n\tinstall -s -m 755 app.tmp app\napp.tmp: main.o lib.o\n\t$(CC) $(CFLAGS) $(LDFLAGS) -o app.tmp main.o lib.o\n%.o: %.c\n\t$(CC) $(CFLAGS) -c $< -o $@\n";
    let p = Project::new(
        &[("lib.c", SIMPLE)],
        &[("lib.c", SIMPLE_FIXED)],
        None,
        Some(makefile),
    );
    let nm = Command::new("nm")
        .arg(p.work.path("src/app"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&nm.stderr).contains("no symbols"),
        "the deployed binary should be stripped"
    );
    apply_and_check(&p, &p.work.path("src/app"), "app");
}

/// A project whose `version.c` embeds `__DATE__`/`__TIME__` and a header generated at every
/// build with the time, the host, a random number and (`NLINES`) something of the tree.
const NOISY_MAKEFILE: &str = "CFLAGS ?= -O2 -g\napp: main.o lib.o version.o\n\t$(CC) $(CFLAGS) -o app main.o lib.o version.o\nversion.o: version.c stamp.h\n\t$(CC) $(CFLAGS) -c version.c -o version.o\n%.o: %.c\n\t$(CC) $(CFLAGS) -c $< -o $@\n.PHONY: stamp.h\nstamp.h:\n\techo \"#define STAMP \\\"$$(date +%s) $$(date) $$(hostname)\\\"\" > stamp.h\n\techo \"#define RANDOM_ID \\\"$$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')\\\"\" >> stamp.h\n\techo \"#define NLINES $(NLINES)\" >> stamp.h\n";
const VERSION_C: &str = "#include \"stamp.h\"\nconst char *version(void) { return __DATE__ \" \" __TIME__ \" \" STAMP; }\n__attribute__((noinline)) const char *build_id(void) { return RANDOM_ID; }\n__attribute__((noinline)) int source_lines(void) { return NLINES + 0; }\n";
const NOISY_LIB: &str = "#include <string.h>\nconst char *version(void);\nconst char *build_id(void);\nint source_lines(void);\nconst char *answer(const char *in) { if (!strcmp(in, \"v\")) return version(); if (!build_id()[0] && source_lines() == -1) return \"?\"; return strlen(in) > 3 ? \"big\" : \"small\"; }\n";

fn noisy_project(nlines: &str, fixed_lib: &str) -> Project {
    let makefile = format!("NLINES = {nlines}\n{NOISY_MAKEFILE}");
    Project::new(
        &[("lib.c", NOISY_LIB), ("version.c", VERSION_C)],
        &[("lib.c", fixed_lib)],
        None,
        Some(&makefile),
    )
}

#[test]
fn real_world_build_time_noise_is_not_a_change() {
    let p = noisy_project("0", &NOISY_LIB.replace("\"big\"", "\"BIG\""));
    let deployed = p.work.path("src/app");
    let mut t = Target::start(&deployed, None);
    let version = t.ask("v");
    assert_eq!(t.ask("abcdef"), "big");
    let out = p.build(&deployed, "app", "fix.suture");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(out.status.success(), "{}{v}", stderr(&out));
    let s = &v["summary"];
    assert_eq!(s["changed"], serde_json::json!(["answer (lib.c)"]), "{v}");
    assert_eq!(s["pulled_in"], serde_json::json!([]), "{v}");
    // The random id differs from build to build: reported, left as it runs.
    assert_eq!(
        s["noise"],
        serde_json::json!(["build_id (version.c)"]),
        "{v}"
    );
    let (ok, a) = apply_to(&p.work.path("fix.suture"), t.pid, &p.public);
    assert!(ok, "{a}");
    assert_eq!(t.ask("abcdef"), "BIG");
    assert_eq!(
        t.ask("v"),
        version,
        "the deployed version string is untouched"
    );
}

#[test]
fn real_world_fix_with_only_build_noise_is_no_code_change() {
    // The fix changes a comment: the only differences are the build's own noise.
    let p = noisy_project("0", &format!("/* checked */\n{NOISY_LIB}"));
    assert_refused(&p, "no-code-change", "the fix changes no code of app");
}

#[test]
fn real_world_change_the_diff_cannot_explain_is_refused() {
    // The generated header counts the lines of lib.c: the fix (to lib.c only) changes
    // `source_lines` in version.c through the build, not through the code.
    let p = noisy_project(
        "$(shell cat lib.c | wc -l)",
        &format!("/* BIG */\n{}", NOISY_LIB.replace("\"big\"", "\"BIG\"")),
    );
    assert_refused(&p, "untraceable", "`source_lines` of version.c changed");
}

#[test]
fn real_world_patch_series_gives_cumulative_levels() {
    // Fix 1 changes the answer, fix 2 (written against fix 1) adds a check. Level 2 is built
    // from both diffs against the same deployed binary and supersedes level 1 live.
    let v1 = SIMPLE_FIXED;
    let v2 = "#include <string.h>\nconst char *answer(const char *in) { if (strchr(in, '%')) return \"rejected\"; return strlen(in) > 3 ? \"BIG\" : \"small\"; }\n";
    let p = Project::new(&[("lib.c", SIMPLE)], &[("lib.c", v1)], None, None);
    for (dir, body) in [("l1", v1), ("l2", v2)] {
        write_file(&p.work.path(dir).join("lib.c"), body);
    }
    let diff2 = Command::new("diff")
        .args(["-ruN", "l1", "l2"])
        .current_dir(p.work.dir.path())
        .output()
        .unwrap();
    std::fs::write(p.work.path("fix2.diff"), &diff2.stdout).unwrap();
    let deployed = p.work.path("src/app");
    let mut t = Target::start(&deployed, None);
    assert_eq!(t.ask("ab%cd"), "big");
    let build = |level: &str, diffs: &[&str], out: &str| {
        let mut args = vec![
            "--json".to_string(),
            "build".into(),
            "--source".into(),
            p.work.path("src").display().to_string(),
            "--target".into(),
            deployed.display().to_string(),
            "--artifact".into(),
            "app".into(),
            "--build-cmd".into(),
            "make".into(),
            "--level".into(),
            level.into(),
            "--key".into(),
            p.key.display().to_string(),
            "--out".into(),
            p.work.path(out).display().to_string(),
        ];
        for d in diffs {
            args.push("--diff".into());
            args.push(p.work.path(d).display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = suture(&args);
        assert!(
            o.status.success(),
            "{}{}",
            stderr(&o),
            String::from_utf8_lossy(&o.stdout)
        );
        p.work.path(out)
    };
    let l1 = build("1", &["fix.diff"], "l1.suture");
    let l2 = build("2", &["fix.diff", "fix2.diff"], "l2.suture");
    let (ok, a) = apply_to(&l1, t.pid, &p.public);
    assert!(ok, "{a}");
    assert_eq!(t.ask("ab%cd"), "BIG");
    let (ok, a) = apply_to(&l2, t.pid, &p.public);
    assert!(ok, "{a}");
    assert_eq!(t.ask("ab%cd"), "rejected");
    assert_eq!(t.ask("abcd"), "BIG", "fix 1 is in level 2");
    let (ok, st) = suture_json(&["status", "--pid", &t.pid_arg()]);
    assert!(ok, "{st}");
    assert!(st.to_string().contains("\"level\":2"), "{st}");
    assert!(!st.to_string().contains("\"level\":1"), "{st}");
}

#[test]
fn real_world_same_static_function_fixed_in_two_files_of_one_name() {
    // One fix to a helper copied into two files named util.c (a vendored copy): both copies
    // are replaced, each at its own address.
    let util = vendored_util;
    let (a, a2) = (util("a", "2"), util("a", "20"));
    let (b, b2) = (util("b", "3"), util("b", "30"));
    let p = Project::new(
        &[("lib.c", UTIL_MAIN), ("a/util.c", &a), ("b/util.c", &b)],
        &[("a/util.c", &a2), ("b/util.c", &b2)],
        None,
        Some(UTIL_MAKEFILE),
    );
    let (v, _t) = live(&p, &[("abc", "7 10", "61 91")]);
    let changed = v["summary"]["changed"].to_string();
    assert_eq!(changed.matches("scale (util.c)").count(), 2, "{v}");
}

#[test]
fn real_world_new_run_time_initialisation_is_new_state_and_free_changes_warn() {
    // The fix makes `answer` set up a table once (pthread_once) and frees a buffer it used
    // to keep: both are about live data the running process set up without them.
    let a = "#include <stdlib.h>\n#include <string.h>\nstatic char *last;\nconst char *answer(const char *in) { char *copy = strdup(in); if (last) free(last); last = copy; return strlen(in) > 3 ? \"big\" : \"small\"; }\n";
    let b = "#include <pthread.h>\n#include <stdlib.h>\n#include <string.h>\nstatic char *last;\nstatic pthread_once_t once = PTHREAD_ONCE_INIT;\nstatic int limit;\nstatic void init(void) { limit = 3; }\nconst char *answer(const char *in) { pthread_once(&once, init); char *copy = strdup(in); if (last) free(last); free(copy); last = NULL; return (int)strlen(in) > limit ? \"BIG\" : \"small\"; }\n";
    let v = patch_live_accepting_new_state(
        &Case {
            files: &[("lib.c", a)],
            fixed: &[("lib.c", b)],
            checks: &[("abcdef", "big", "BIG"), ("ab", "small", "small")],
        },
        &[
            "answer (lib.c) now initialises at run time (pthread_once)",
            "once (lib.c)",
        ],
    );
    let warnings = v["summary"]["warnings"].to_string();
    assert!(
        warnings.contains("answer (lib.c) calls free 2 times where it called it 1 times"),
        "{v}"
    );
}

#[test]
fn real_world_static_of_an_inlined_helper_keeps_its_state_when_its_callers_change() {
    // `hits` lives in an always-inline helper: gcc sees it as referenced by the helper's
    // callers, and the fix removes one of them. It is still the one live counter.
    let f = |a_body: &str| {
        format!("#include <stdio.h>\nstatic inline __attribute__((always_inline)) int bump(void) {{ static int hits; return ++hits; }}\n__attribute__((noinline)) int a_fn(void) {{ {a_body} }}\n__attribute__((noinline)) int b_fn(void) {{ return bump() * 10; }}\nconst char *answer(const char *in) {{ static char b[32]; snprintf(b, sizeof b, \"%d\", in[0] == 'a' ? a_fn() : b_fn()); return b; }}\n")
    };
    let (a, b) = (f("return bump();"), f("return -1;"));
    let p = Project::new(&[("lib.c", &a)], &[("lib.c", &b)], None, None);
    let (v, mut t) = live(&p, &[("a", "1", "-1"), ("b", "20", "30")]);
    assert_eq!(
        v["summary"]["changed"],
        serde_json::json!(["a_fn (lib.c)"]),
        "{v}"
    );
    assert_eq!(t.ask("b"), "40", "the deployed counter carried on");
}

/// `util.c` as vendored twice, byte for byte: a static helper with an assert, called by one
/// exported function named after the copy.
fn vendored_util(prefix: &str, k: &str) -> String {
    format!("#include <assert.h>\nstatic __attribute__((noinline)) int scale(int n) {{ assert(n >= 0); return n * {k}; }}\n__attribute__((noinline)) int {prefix}_score(int n) {{ return scale(n) + 1; }}\n")
}

#[test]
fn real_world_identical_copies_of_a_file_are_told_apart_by_their_callers() {
    // a/util.c and b/util.c have the same static `scale`, byte for byte: only which exported
    // function calls which copy tells them apart. The fix changes b's copy only.
    let (a, b) = (vendored_util("a", "2"), vendored_util("b", "2"));
    let b2 = b.replace("n * 2", "n * 20");
    let p = Project::new(
        &[("lib.c", UTIL_MAIN), ("a/util.c", &a), ("b/util.c", &b)],
        &[("b/util.c", &b2)],
        None,
        Some(UTIL_MAKEFILE),
    );
    live(&p, &[("abc", "7 7", "7 61")]);
}

#[test]
fn real_world_indistinguishable_locals_are_refused_as_ambiguous() {
    // Two identical files whose static is called by nothing exported (only through a
    // constructor): nothing tells which copy is which.
    let util = |k: &str| {
        format!("static int level;\nstatic __attribute__((noinline, used)) int helper(int n) {{ return n * {k} + level; }}\n__attribute__((constructor)) static void init(void) {{ level = helper(1); }}\n")
    };
    let p = Project::new(
        &[
            ("lib.c", SIMPLE),
            ("a/util.c", &util("2")),
            ("b/util.c", &util("2")),
        ],
        &[("b/util.c", &util("3"))],
        None,
        Some(UTIL_MAKEFILE),
    );
    assert_refused(&p, "ambiguous-symbol", "2 files named util.c");
}
