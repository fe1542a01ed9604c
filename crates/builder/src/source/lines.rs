//! Where the fix moved lines: the old → new line mapping of each file the diff touches.
//!
//! A function whose source text the fix did not touch can still compile differently when it
//! records line numbers (`__LINE__` in assertion, logging or accounting macros) below a hunk.
//! Such a function behaves the same apart from the line it reports, so the builder keeps the
//! running copy rather than replacing (and having to stop outside of) it.

use std::path::Path;

/// One hunk's old and new ranges (1-based start, length).
#[derive(Debug, Clone, Copy)]
struct Hunk {
    old_start: u64,
    old_len: u64,
    new_len: u64,
}

/// The hunks of every file of a unified diff, by the file's path as the diff names it.
#[derive(Debug, Default)]
pub struct LineMap {
    files: Vec<(String, Vec<Hunk>)>,
}

impl LineMap {
    pub fn parse(diff: &str) -> LineMap {
        let mut map = LineMap::default();
        for line in diff.lines() {
            if let Some(path) = line.strip_prefix("+++ ") {
                // `+++ b/src/x.c<TAB>date`: the path ends at a tab.
                let path = path.split('\t').next().unwrap_or(path).trim();
                map.files.push((path.to_string(), Vec::new()));
            } else if let Some(rest) = line.strip_prefix("@@ -") {
                let (Some(hunk), Some((_, file))) = (parse_hunk(rest), map.files.last_mut()) else {
                    continue;
                };
                file.push(hunk);
            }
        }
        map
    }

    /// Whether the diff moves unchanged line `old` of source file `file` (relative to the
    /// tree) to `new` (`old != new`). The diff may name it with a leading `a/`, `b/` or not.
    pub fn moved(&self, file: &Path, old: u64, new: u64) -> bool {
        old != new
            && self
                .files
                .iter()
                .filter(|(path, _)| names(path, file))
                .any(|(_, h)| map_line(h, old) == Some(new))
    }
}

/// The line maps of a series of diffs applied in order (fix 1, fix 2, …): a line moves by
/// the composition of their moves.
#[derive(Debug, Default)]
pub struct Series {
    steps: Vec<LineMap>,
}

impl Series {
    pub fn new(steps: Vec<LineMap>) -> Series {
        Series { steps }
    }

    /// Whether the series moves unchanged line `old` of `file` to `new` (`old != new`).
    pub fn moved(&self, file: &Path, old: u64, new: u64) -> bool {
        if old == new {
            return false;
        }
        let mut line = old;
        for step in &self.steps {
            match step.map(file, line) {
                Some(n) => line = n,
                None => return false,
            }
        }
        line == new
    }

    pub fn touches(&self, file: &Path) -> bool {
        self.steps.iter().any(|s| s.touches(file))
    }

    pub fn touches_path(&self, path: &Path) -> bool {
        self.steps.iter().any(|s| s.touches_path(path))
    }

    pub fn only_sources(&self) -> bool {
        !self.steps.is_empty() && self.steps.iter().all(LineMap::only_sources)
    }
}

impl LineMap {
    /// Where unchanged line `old` of `file` is after this diff: itself if the diff does not
    /// touch the file, `None` if a hunk covers it.
    fn map(&self, file: &Path, old: u64) -> Option<u64> {
        match self.files.iter().find(|(path, _)| names(path, file)) {
            Some((_, hunks)) => map_line(hunks, old),
            None => Some(old),
        }
    }

    /// Whether the diff touches `file` (relative to the tree).
    pub fn touches(&self, file: &Path) -> bool {
        self.files.iter().any(|(path, _)| names(path, file))
    }

    /// Whether `path` (from debug info: absolute, or relative to the build folder) is a file
    /// the diff touches.
    pub fn touches_path(&self, path: &Path) -> bool {
        self.files.iter().any(|(p, _)| {
            let p = Path::new(p);
            let without_prefix: std::path::PathBuf = p.components().skip(1).collect();
            (p.components().count() > 0 && path.ends_with(p))
                || (without_prefix.components().count() > 0 && path.ends_with(&without_prefix))
        })
    }

    /// Whether every file the diff touches is a C or C++ source file (not a header, a
    /// generator's input or a build file): then nothing the fix changes can reach an object
    /// compiled from another file, except through an `#include` its debug info records.
    pub fn only_sources(&self) -> bool {
        const SOURCES: &[&str] = &["c", "cc", "cpp", "cxx", "C", "c++"];
        !self.files.is_empty()
            && self.files.iter().all(|(p, _)| {
                Path::new(p)
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| SOURCES.contains(&e))
            })
    }
}

/// Whether the diff's `path` (`b/src/x.c`, `src/x.c`) names `file` (`src/x.c`).
fn names(path: &str, file: &Path) -> bool {
    let path = Path::new(path);
    path == file || path.components().skip(1).collect::<std::path::PathBuf>() == file
}

/// `a,b +c,d @@ …` → the hunk (a missing length means 1).
fn parse_hunk(rest: &str) -> Option<Hunk> {
    let (old, rest) = rest.split_once(' ')?;
    let new = rest.strip_prefix('+')?.split(' ').next()?;
    let range = |r: &str| -> Option<(u64, u64)> {
        match r.split_once(',') {
            Some((s, l)) => Some((s.parse().ok()?, l.parse().ok()?)),
            None => Some((r.parse().ok()?, 1)),
        }
    };
    let (old_start, old_len) = range(old)?;
    let (_, new_len) = range(new)?;
    Some(Hunk {
        old_start,
        old_len,
        new_len,
    })
}

/// Where unchanged line `old` is after the hunks; `None` if a hunk covers it.
fn map_line(hunks: &[Hunk], old: u64) -> Option<u64> {
    let mut shift: i64 = 0;
    for h in hunks {
        // A hunk of zero old lines inserts after line `old_start`.
        let (first, end) = if h.old_len == 0 {
            (h.old_start + 1, h.old_start + 1)
        } else {
            (h.old_start, h.old_start + h.old_len)
        };
        if old >= end {
            shift += h.new_len as i64 - h.old_len as i64;
        } else if old >= first {
            return None; // inside the hunk: context or changed, not a plain move
        }
    }
    u64::try_from(old as i64 + shift).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIFF: &str = "--- a/x.c\n+++ b/x.c\n@@ -10,3 +10,9 @@ f(void) {\n ctx\n+a\n+b\n+c\n+d\n+e\n+f\n ctx\n ctx\n@@ -40,2 +46,1 @@\n-gone\n ctx\n";

    #[test]
    fn lines_below_hunks_move_by_what_the_hunks_add() {
        let m = LineMap::parse(DIFF);
        let x = Path::new("x.c");
        assert!(m.moved(x, 100, 105)); // +6 then -1
        assert!(m.moved(x, 20, 26));
        assert!(!m.moved(x, 5, 5)); // unmoved lines are not "moved"
        assert!(!m.moved(x, 11, 17)); // inside a hunk
        assert!(!m.moved(x, 100, 106));
        assert!(!m.moved(Path::new("y.c"), 100, 105)); // another file's lines did not move
    }

    #[test]
    fn a_series_of_diffs_composes_its_moves() {
        let second = "--- a/x.c\n+++ b/x.c\n@@ -1,1 +1,3 @@\n ctx\n+g\n+h\n";
        let s = Series::new(vec![LineMap::parse(DIFF), LineMap::parse(second)]);
        let x = Path::new("x.c");
        assert!(s.moved(x, 100, 107)); // +5, then +2
        assert!(!s.moved(x, 100, 105));
        assert!(s.touches(x) && !s.touches(Path::new("y.c")));
    }
}
