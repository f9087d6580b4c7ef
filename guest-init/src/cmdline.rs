//! Parsing of guest-init's parameters from the kernel command line.
//!
//! The kernel command line carries only bootstrap values (DESIGN.md): which command to run
//! and how to end the VM. Everything here is a pure function of the text so it is tested
//! without a guest.
//!
//! Parameters (all prefixed `gi.` so they never collide with the kernel's own):
//! - `gi.cmd=WORDS` the command to run. Wrap the whole parameter in double quotes when the
//!   command has spaces (the kernel's own quoting); inside, group words with single quotes
//!   and escape a character with a backslash, as in a shell:
//!   `gi.cmd="busybox sh -c 'exit 7'"`.
//! - `gi.end=reboot|poweroff|halt` how to end the VM after the command (default `reboot`:
//!   VMMs without ACPI end the VM on a guest reboot).
//! - `gi.statusport=PORT` an I/O port (decimal or 0x hex) where the VMM listens for the
//!   ready marker and the command's exit status; set by `vmm`, absent under other VMMs.
//! - `gi.agent=PORT` serve the guest agent on this vsock port (decimal or 0x hex,
//!   1..=0xfffffffe). Without `gi.cmd`, guest-init then serves the agent until a `Shutdown`
//!   request instead of printing the summary.

use std::fmt;

/// Longest command line the parser accepts; the x86 kernel's own limit is 2048 bytes by
/// default, so anything larger did not come from the kernel.
pub const MAX_CMDLINE_LEN: usize = 64 * 1024;

/// How guest-init ends the VM once the command has finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndAction {
    /// `reboot(RB_AUTOBOOT)`: the VMM sees a reboot and exits.
    Reboot,
    /// `reboot(RB_POWER_OFF)`: needs a VMM that handles power-off (ACPI).
    PowerOff,
    /// `reboot(RB_HALT_SYSTEM)`: stops the CPUs; the VMM keeps running.
    Halt,
}

/// guest-init's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// Command and arguments; `None` runs the built-in summary.
    pub cmd: Option<Vec<String>>,
    /// What to do after the command exits.
    pub end: EndAction,
    /// Port for the VMM's status device, if any.
    pub status_port: Option<u16>,
    /// Vsock port the guest agent listens on, if any.
    pub agent_port: Option<u32>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            cmd: None,
            end: EndAction::Reboot,
            status_port: None,
            agent_port: None,
        }
    }
}

/// Why a command line could not be turned into [`Params`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdlineError {
    /// The text is longer than [`MAX_CMDLINE_LEN`].
    TooLong(usize),
    /// A double quote opened on the kernel command line is never closed.
    UnterminatedKernelQuote,
    /// A quote inside `gi.cmd` is never closed.
    UnterminatedQuote(char),
    /// `gi.cmd` ends with a lone backslash.
    TrailingBackslash,
    /// `gi.cmd` is present but has no words.
    EmptyCommand,
    /// A `gi.` parameter has a value that is not allowed.
    BadValue {
        /// The parameter's name.
        param: String,
        /// The value given.
        value: String,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// A `gi.` parameter this version does not know (most likely a typo).
    UnknownParam(String),
}

impl fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdlineError::TooLong(n) => {
                write!(f, "kernel cmdline is {n} bytes, over {MAX_CMDLINE_LEN}")
            }
            CmdlineError::UnterminatedKernelQuote => {
                write!(f, "kernel cmdline has an unterminated double quote")
            }
            CmdlineError::UnterminatedQuote(q) => write!(f, "gi.cmd: unterminated {q} quote"),
            CmdlineError::TrailingBackslash => write!(f, "gi.cmd: ends with a lone backslash"),
            CmdlineError::EmptyCommand => write!(f, "gi.cmd: empty command"),
            CmdlineError::BadValue {
                param,
                value,
                expected,
            } => write!(f, "{param}: bad value {value:?}, expected {expected}"),
            CmdlineError::UnknownParam(p) => write!(f, "unknown parameter {p}"),
        }
    }
}

impl std::error::Error for CmdlineError {}

/// Splits the kernel command line into parameters the way the kernel does: spaces separate
/// them, and double quotes (which are removed) protect spaces.
pub fn split_kernel_params(text: &str) -> Result<Vec<String>, CmdlineError> {
    let mut params = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut has_token = false;
    for c in text.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                has_token = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has_token {
                    params.push(std::mem::take(&mut cur));
                    has_token = false;
                }
            }
            c => {
                cur.push(c);
                has_token = true;
            }
        }
    }
    if in_quotes {
        return Err(CmdlineError::UnterminatedKernelQuote);
    }
    if has_token {
        params.push(cur);
    }
    Ok(params)
}

/// Splits `gi.cmd`'s value into words: whitespace separates, single or double quotes group,
/// a backslash escapes the next character (outside single quotes).
pub fn split_command_words(text: &str) -> Result<Vec<String>, CmdlineError> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut has_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                has_word = true;
                let quote = c;
                loop {
                    match chars.next() {
                        None => return Err(CmdlineError::UnterminatedQuote(quote)),
                        Some(q) if q == quote => break,
                        Some('\\') if quote == '"' => match chars.next() {
                            None => return Err(CmdlineError::UnterminatedQuote(quote)),
                            Some(e) => cur.push(e),
                        },
                        Some(other) => cur.push(other),
                    }
                }
            }
            '\\' => match chars.next() {
                None => return Err(CmdlineError::TrailingBackslash),
                Some(e) => {
                    cur.push(e);
                    has_word = true;
                }
            },
            c if c.is_whitespace() => {
                if has_word {
                    words.push(std::mem::take(&mut cur));
                    has_word = false;
                }
            }
            c => {
                cur.push(c);
                has_word = true;
            }
        }
    }
    if has_word {
        words.push(cur);
    }
    Ok(words)
}

fn parse_port(value: &str) -> Option<u16> {
    match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u16::from_str_radix(hex, 16).ok(),
        None => value.parse().ok(),
    }
}

/// A vsock port to listen on: decimal or 0x hex, neither 0 nor `VMADDR_PORT_ANY`
/// (0xffffffff, which asks the kernel to pick one).
fn parse_vsock_port(value: &str) -> Option<u32> {
    let port = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => value.parse().ok(),
    }?;
    (port != 0 && port != u32::MAX).then_some(port)
}

/// Finds `gi.statusport=` even in a command line that [`parse`] rejects, so guest-init can
/// still report its own failure to the VMM. Best effort: plain whitespace splitting.
pub fn status_port_only(text: &str) -> Option<u16> {
    text.split_whitespace()
        .filter_map(|p| p.strip_prefix("gi.statusport="))
        .filter_map(parse_port)
        .next_back()
}

/// Parses guest-init's parameters out of the whole kernel command line. Parameters that do
/// not start with `gi.` belong to the kernel and are ignored; the last occurrence of a
/// repeated `gi.` parameter wins, as with the kernel's own parameters.
pub fn parse(text: &str) -> Result<Params, CmdlineError> {
    if text.len() > MAX_CMDLINE_LEN {
        return Err(CmdlineError::TooLong(text.len()));
    }
    let mut params = Params::default();
    for param in split_kernel_params(text)? {
        let Some(rest) = param.strip_prefix("gi.") else {
            continue;
        };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        match key {
            "cmd" => {
                let words = split_command_words(value)?;
                if words.is_empty() {
                    return Err(CmdlineError::EmptyCommand);
                }
                params.cmd = Some(words);
            }
            "end" => {
                params.end = match value {
                    "reboot" => EndAction::Reboot,
                    "poweroff" => EndAction::PowerOff,
                    "halt" => EndAction::Halt,
                    _ => {
                        return Err(CmdlineError::BadValue {
                            param: "gi.end".into(),
                            value: value.into(),
                            expected: "reboot, poweroff or halt",
                        })
                    }
                }
            }
            "statusport" => {
                params.status_port =
                    Some(parse_port(value).ok_or_else(|| CmdlineError::BadValue {
                        param: "gi.statusport".into(),
                        value: value.into(),
                        expected: "a port number 0..=65535 (decimal or 0x hex)",
                    })?)
            }
            "agent" => {
                params.agent_port =
                    Some(
                        parse_vsock_port(value).ok_or_else(|| CmdlineError::BadValue {
                            param: "gi.agent".into(),
                            value: value.into(),
                            expected: "a vsock port 1..=4294967294 (decimal or 0x hex)",
                        })?,
                    )
            }
            _ => return Err(CmdlineError::UnknownParam(format!("gi.{key}"))),
        }
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn kernel_params_respect_double_quotes() {
        let p = split_kernel_params(r#"console=ttyS0 gi.cmd="a b  c" quiet"#).unwrap();
        assert_eq!(p, words(&["console=ttyS0", "gi.cmd=a b  c", "quiet"]));
    }

    #[test]
    fn kernel_params_empty_and_whitespace() {
        assert!(split_kernel_params("").unwrap().is_empty());
        assert!(split_kernel_params("  \n\t ").unwrap().is_empty());
        // An empty quoted parameter is still a parameter.
        assert_eq!(split_kernel_params(r#""""#).unwrap(), words(&[""]));
    }

    #[test]
    fn kernel_params_unterminated_quote_is_an_error() {
        assert_eq!(
            split_kernel_params(r#"gi.cmd="sh -c"#),
            Err(CmdlineError::UnterminatedKernelQuote)
        );
    }

    #[test]
    fn command_words_shell_like() {
        assert_eq!(
            split_command_words("busybox sh -c 'exit 7'").unwrap(),
            words(&["busybox", "sh", "-c", "exit 7"])
        );
        assert_eq!(
            split_command_words(r#"echo a\ b "c \"d\"" ''"#).unwrap(),
            words(&["echo", "a b", "c \"d\"", ""])
        );
        assert_eq!(
            split_command_words("x'y'z").unwrap(),
            words(&["xyz"]),
            "adjacent quoted and bare parts join into one word"
        );
    }

    #[test]
    fn command_words_errors() {
        assert_eq!(
            split_command_words("sh -c 'exit"),
            Err(CmdlineError::UnterminatedQuote('\''))
        );
        assert_eq!(
            split_command_words("echo \"a"),
            Err(CmdlineError::UnterminatedQuote('"'))
        );
        assert_eq!(
            split_command_words("echo \\"),
            Err(CmdlineError::TrailingBackslash)
        );
    }

    #[test]
    fn parse_full_cmdline() {
        let p = parse(
            r#"console=ttyS0 reboot=k panic=-1 gi.cmd="busybox sh -c 'exit 7'" gi.end=halt gi.statusport=0x440"#,
        )
        .unwrap();
        assert_eq!(p.cmd, Some(words(&["busybox", "sh", "-c", "exit 7"])));
        assert_eq!(p.end, EndAction::Halt);
        assert_eq!(p.status_port, Some(0x440));
    }

    #[test]
    fn parse_defaults_when_no_gi_params() {
        let p = parse("console=ttyS0 root=/dev/vda rw\n").unwrap();
        assert_eq!(p, Params::default());
        assert_eq!(p.end, EndAction::Reboot);
    }

    #[test]
    fn parse_last_repeated_param_wins() {
        let p = parse("gi.cmd=true gi.cmd=false").unwrap();
        assert_eq!(p.cmd, Some(words(&["false"])));
    }

    #[test]
    fn parse_rejects_empty_command() {
        assert_eq!(parse("gi.cmd="), Err(CmdlineError::EmptyCommand));
        assert_eq!(parse(r#"gi.cmd="   ""#), Err(CmdlineError::EmptyCommand));
        assert_eq!(parse("gi.cmd"), Err(CmdlineError::EmptyCommand));
    }

    #[test]
    fn parse_rejects_bad_values_naming_the_param() {
        let e = parse("gi.end=explode").unwrap_err();
        assert!(e.to_string().contains("gi.end"), "{e}");
        assert!(e.to_string().contains("explode"), "{e}");
        for bad in [
            "gi.statusport=70000",
            "gi.statusport=0xzz",
            "gi.statusport=",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.to_string().contains("gi.statusport"), "{bad}: {e}");
        }
        assert_eq!(parse("gi.statusport=1088").unwrap().status_port, Some(1088));
    }

    #[test]
    fn parse_agent_port() {
        assert_eq!(parse("gi.agent=52").unwrap().agent_port, Some(52));
        assert_eq!(parse("gi.agent=0x400").unwrap().agent_port, Some(1024));
        assert_eq!(
            parse("gi.agent=4294967294").unwrap().agent_port,
            Some(u32::MAX - 1)
        );
        let p = parse(r#"gi.cmd="sh -c 'exit 7'" gi.agent=1024"#).unwrap();
        assert_eq!(p.agent_port, Some(1024));
        assert!(p.cmd.is_some());
        assert_eq!(parse("gi.cmd=true").unwrap().agent_port, None);
    }

    #[test]
    fn parse_rejects_bad_agent_ports_naming_the_param() {
        for bad in [
            "gi.agent=",
            "gi.agent",
            "gi.agent=0",
            "gi.agent=4294967295",
            "gi.agent=0xffffffff",
            "gi.agent=4294967296",
            "gi.agent=-1",
            "gi.agent=vsock",
            "gi.agent=0x",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(
                matches!(&e, CmdlineError::BadValue { param, .. } if param == "gi.agent"),
                "{bad}: {e:?}"
            );
            assert!(
                e.to_string().starts_with("gi.agent: bad value"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn status_port_is_found_in_a_rejected_cmdline() {
        let text = r#"gi.cmd="sh -c 'exit" gi.statusport=0x440"#;
        assert!(parse(text).is_err());
        assert_eq!(status_port_only(text), Some(0x440));
        assert_eq!(status_port_only("gi.statusport=nope"), None);
        assert_eq!(status_port_only(""), None);
    }

    #[test]
    fn parse_rejects_unknown_gi_param() {
        assert_eq!(
            parse("gi.cdm=true"),
            Err(CmdlineError::UnknownParam("gi.cdm".into()))
        );
    }

    #[test]
    fn parse_rejects_oversized_cmdline() {
        let big = "x".repeat(MAX_CMDLINE_LEN + 1);
        assert_eq!(parse(&big), Err(CmdlineError::TooLong(MAX_CMDLINE_LEN + 1)));
    }

    #[test]
    fn parse_handles_non_ascii_without_panicking() {
        let p = parse("gi.cmd=\"echo 'héllo wörld' ✓\"").unwrap();
        assert_eq!(p.cmd, Some(words(&["echo", "héllo wörld", "✓"])));
    }
}
