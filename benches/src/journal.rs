//! The run journal: every finished run's outcome, appended as it happens, so a harness run
//! whose test host wedged can resume in a fresh test host without redoing finished runs.
//!
//! One line per run, tab-separated: `ok METRIC SIDE RUN VALUE` or
//! `fail METRIC SIDE RUN MESSAGE` (the message's first line). A run that was under way
//! when the test host wedged has no line and is done again.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

/// How one run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The measured value.
    Ok(f64),
    /// Why it failed.
    Failed(String),
}

/// Identifies a run: metric, side ("ours"/"peer"), run number.
pub type RunKey = (String, String, u32);

/// Outcomes so far, and the file new ones are appended to.
pub struct Journal {
    done: HashMap<RunKey, Outcome>,
    file: Option<File>,
}

/// Parses one journal line.
pub fn parse_line(line: &str) -> Option<(RunKey, Outcome)> {
    let mut f = line.splitn(5, '\t');
    let kind = f.next()?;
    let metric = f.next()?.to_string();
    let side = f.next()?.to_string();
    let run = f.next()?.parse().ok()?;
    let rest = f.next()?;
    let outcome = match kind {
        "ok" => Outcome::Ok(rest.parse().ok()?),
        "fail" => Outcome::Failed(rest.to_string()),
        _ => return None,
    };
    Some(((metric, side, run), outcome))
}

/// One journal line, without the newline.
pub fn format_line(key: &RunKey, outcome: &Outcome) -> String {
    let (metric, side, run) = key;
    match outcome {
        Outcome::Ok(v) => format!("ok\t{metric}\t{side}\t{run}\t{v}"),
        Outcome::Failed(m) => {
            let first = m.lines().next().unwrap_or_default().replace('\t', " ");
            format!("fail\t{metric}\t{side}\t{run}\t{first}")
        }
    }
}

impl Journal {
    /// A journal kept in memory only.
    pub fn in_memory() -> Journal {
        Journal {
            done: HashMap::new(),
            file: None,
        }
    }

    /// Loads the outcomes already in `path` (if any) and appends new ones to it.
    pub fn open(path: &Path) -> std::io::Result<Journal> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // A line cut short by the wedge (no newline) is ignored and rewritten.
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        let done = complete.lines().filter_map(parse_line).collect();
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        if complete.len() < text.len() {
            file.set_len(u64::try_from(complete.len()).unwrap_or(0))?;
        }
        Ok(Journal {
            done,
            file: Some(file),
        })
    }

    /// The outcome of a run done earlier, if any.
    pub fn get(&self, key: &RunKey) -> Option<&Outcome> {
        self.done.get(key)
    }

    /// How many runs are recorded.
    pub fn len(&self) -> usize {
        self.done.len()
    }

    /// Whether no run is recorded.
    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }

    /// Records a finished run (best effort on disk: the benchmark goes on without it).
    pub fn record(&mut self, key: RunKey, outcome: Outcome) {
        if let Some(f) = &mut self.file {
            let _ = writeln!(f, "{}", format_line(&key, &outcome)).and_then(|()| f.flush());
        }
        self.done.insert(key, outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(run: u32) -> RunKey {
        ("boot_ready_ms_1vcpu".into(), "ours".into(), run)
    }

    #[test]
    fn lines_round_trip() {
        let ok = (key(3), Outcome::Ok(1234.5));
        assert_eq!(parse_line(&format_line(&ok.0, &ok.1)), Some(ok));
        let fail = (
            key(4),
            Outcome::Failed("vmm: no ready\tline\nconsole tail".into()),
        );
        assert_eq!(
            parse_line(&format_line(&fail.0, &fail.1)),
            Some((key(4), Outcome::Failed("vmm: no ready line".into())))
        );
        assert_eq!(parse_line("ok\tm\tours\tx\t1"), None);
        assert_eq!(parse_line("maybe\tm\tours\t1\t1"), None);
    }

    #[test]
    fn reopening_resumes_and_drops_a_cut_line() {
        let path = std::env::temp_dir().join(format!("bench-journal-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut j = Journal::open(&path).unwrap();
        assert!(j.is_empty());
        j.record(key(1), Outcome::Ok(10.0));
        j.record(key(2), Outcome::Failed("timeout".into()));
        drop(j);
        // A write cut short by the wedge.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        write!(f, "ok\tboot_ready_ms_1vcpu\tours\t3\t1").unwrap();
        drop(f);
        let mut j = Journal::open(&path).unwrap();
        assert_eq!(j.len(), 2);
        assert_eq!(j.get(&key(1)), Some(&Outcome::Ok(10.0)));
        assert_eq!(j.get(&key(2)), Some(&Outcome::Failed("timeout".into())));
        assert_eq!(j.get(&key(3)), None);
        j.record(key(3), Outcome::Ok(30.0));
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.len(), 3);
        assert_eq!(j.get(&key(3)), Some(&Outcome::Ok(30.0)));
        let _ = std::fs::remove_file(&path);
    }
}
