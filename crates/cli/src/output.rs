//! Printing results: human lines by default, one JSON document with `--json`.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::Serialize;
use suture_engine::EngineError;

pub fn json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode output: {e}"),
    }
}

/// Characters a terminal acts on or that change how a line reads: C0 controls, DEL, C1
/// controls (U+0080..U+009F: U+009B is CSI on some terminals), line/paragraph separators and
/// the bidirectional overrides and isolates that reorder the text shown.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// Text from a bundle, a key file or a process, made safe to print on a terminal: every
/// control character is shown as an escape (`\n`, `\r`, `\t`, `\x1b`, `\u{9b}`), so such
/// text can neither drive the terminal nor start a line of its own that looks like ours.
/// Borrowed unchanged when there is nothing to escape (the usual case).
pub fn clean(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_unsafe(c) && (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if is_unsafe(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The one-line error every failing command ends with. Errors can quote bundle text and
/// paths, so the human form is [`clean`]ed; JSON escapes on its own.
pub fn error(as_json: bool, e: &anyhow::Error) {
    let kind = e
        .downcast_ref::<EngineError>()
        .map(EngineError::kind)
        .unwrap_or("error");
    let line = format!("{e:#}").replace('\n', " ");
    let refusal = suture_build::source::refusal_of(e);
    if let (true, Some(r)) = (as_json, refusal) {
        json(
            &serde_json::json!({ "ok": false, "kind": "refused", "reason": r.reason.code(), "error": line }),
        );
    } else if as_json {
        json(&serde_json::json!({ "ok": false, "kind": kind, "error": line }));
    } else {
        eprintln!("error: {}", clean(&line));
    }
}

#[cfg(test)]
mod tests {
    use super::clean;

    #[test]
    fn clean_escapes_controls_and_keeps_the_rest() {
        assert!(matches!(
            clean("fix parse_header — ü"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            clean("a\x1b[2J\nsigned by\r\t\x7f\0"),
            "a\\x1b[2J\\nsigned by\\r\\t\\x7f\\x00"
        );
        assert_eq!(clean("\u{9b}2J \u{85}x"), "\\u{9b}2J \\u{85}x");
        assert_eq!(clean("abc\u{202e}def\u{2028}"), "abc\\u{202e}def\\u{2028}");
    }
}
