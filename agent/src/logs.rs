//! How the binaries log: ANSI colours only when a person reads them.
//!
//! Log lines that go to a file, a pipe or the journal must stay plain text: colour codes make
//! them hard to grep and unreadable in `journalctl`. So colours are on only when stderr (where
//! both binaries log) is a terminal and `NO_COLOR` (<https://no-color.org>) is unset or empty.

use std::ffi::OsStr;
use std::io::IsTerminal;

/// Whether to colour log lines written to a terminal (`is_terminal`) given `NO_COLOR`.
pub fn use_ansi(is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// [`use_ansi`] for this process's stderr and environment.
pub fn stderr_ansi() -> bool {
    use_ansi(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(use_ansi(true, None));
        assert!(use_ansi(true, Some(OsStr::new(""))));
        assert!(!use_ansi(true, Some(OsStr::new("1"))));
        assert!(!use_ansi(false, None));
        assert!(!use_ansi(false, Some(OsStr::new(""))));
    }
}
