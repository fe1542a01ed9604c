//! Why a fix cannot be applied live, as a typed error: the command line tells a refusal (a
//! correct answer: the fix needs a normal update and a restart) from a tool failure, and
//! gives scripts a stable reason code.

use std::fmt;

/// The stable, machine-readable reason of a [`Refusal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// A struct/union/class layout that existing data uses changed.
    Layout,
    /// The initial value or the size of existing data changed.
    DataInit,
    /// New writable state or run-time initialisation that changed functions depend on.
    NewState,
    /// Thread-local data changed or was added.
    Tls,
    /// A constructor or destructor (or their registration) changed.
    Constructor,
    /// A function to replace is shorter than the detour.
    TooShort,
    /// A function to replace branches back into the bytes the detour overwrites.
    DetourSite,
    /// The fix changes no code of the target.
    NoCodeChange,
    /// A symbol the patch must bind to has several candidates in the deployed module.
    AmbiguousSymbol,
    /// Code changed that the diff cannot have changed, and not by demonstrable build noise.
    Untraceable,
}

impl RefusalKind {
    pub fn code(self) -> &'static str {
        match self {
            RefusalKind::Layout => "layout",
            RefusalKind::DataInit => "data-init",
            RefusalKind::NewState => "new-state",
            RefusalKind::Tls => "tls",
            RefusalKind::Constructor => "constructor",
            RefusalKind::TooShort => "too-short",
            RefusalKind::DetourSite => "detour-site",
            RefusalKind::NoCodeChange => "no-code-change",
            RefusalKind::AmbiguousSymbol => "ambiguous-symbol",
            RefusalKind::Untraceable => "untraceable",
        }
    }
}

impl fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// The builder's verdict that the fix cannot become a live patch (no bundle is written).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub reason: RefusalKind,
    pub message: String,
}

impl Refusal {
    pub fn new(reason: RefusalKind, message: impl Into<String>) -> Refusal {
        Refusal {
            reason,
            message: message.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            RefusalKind::NoCodeChange => {
                write!(f, "nothing to patch ({}): {}", self.reason, self.message)
            }
            RefusalKind::AmbiguousSymbol | RefusalKind::Untraceable => {
                write!(
                    f,
                    "cannot be live-patched ({}): {}",
                    self.reason, self.message
                )
            }
            _ => write!(
                f,
                "cannot be live-patched ({}): {} (a normal update and a restart are needed)",
                self.reason, self.message
            ),
        }
    }
}

impl std::error::Error for Refusal {}

/// A [`Refusal`] as an `anyhow::Error` (context added later keeps it downcastable).
pub(crate) fn refuse(reason: RefusalKind, what: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Refusal::new(reason, what))
}

/// The refusal behind `e`, if it is one.
pub fn refusal_of(e: &anyhow::Error) -> Option<&Refusal> {
    e.downcast_ref::<Refusal>()
}
