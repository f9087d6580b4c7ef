//! The one error type of gtool: what failed, and why. `main` prints it as
//! `gtool: <subcommand>: <what failed>: <why>` and exits 1.

use std::fmt;
use std::io;

/// A failure of a subcommand, ready to print.
#[derive(Debug)]
pub struct ToolError {
    /// What gtool was doing, e.g. `connect to 2:5000`.
    pub what: String,
    /// Why it failed: the errno text for system calls, a short reason otherwise.
    pub cause: String,
}

impl ToolError {
    /// A failure that has no errno behind it (bad argument, data mismatch).
    pub fn new(what: impl Into<String>, cause: impl Into<String>) -> ToolError {
        ToolError {
            what: what.into(),
            cause: cause.into(),
        }
    }

    /// A failed system call.
    pub fn io(what: impl Into<String>, err: &io::Error) -> ToolError {
        ToolError::new(what, err.to_string())
    }
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.cause)
    }
}

/// Adds "what failed" to an `io::Result`.
pub trait Context<T> {
    /// Names the failed step; the closure runs only on error.
    fn ctx<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T, ToolError>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T, ToolError> {
        self.map_err(|e| ToolError::io(what(), &e))
    }
}
