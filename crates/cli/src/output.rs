//! Printing results: human lines by default, one JSON document with `--json`.

use serde::Serialize;
use suture_engine::EngineError;

pub fn json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode output: {e}"),
    }
}

/// The one-line error every failing command ends with.
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
        eprintln!("error: {line}");
    }
}
