//! Progress of a harness run, shown where the user is.
//!
//! On a terminal it is an `indicatif` bar; elsewhere, one plain line per finished run.
//! Inside the KVM test host the harness's own output reaches the user through the test
//! host's console pipe, which arrives in large delayed chunks, so there the inner harness
//! instead appends [`Event`]s to a file in the repository (a shared mount) and the outer
//! harness, which waits for the test host, follows that file and shows the progress.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};

/// One progress event, a line of the progress file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// How many runs the harness will do.
    Total(u64),
    /// A run starts.
    Start(String),
    /// A run ended; its one-line result.
    Done(String),
    /// A line to show as it is (the run's commit and machine).
    Note(String),
}

impl Event {
    /// The event as one line (newlines in messages become ` / `), without the newline.
    pub fn encode(&self) -> String {
        let flat = |s: &str| s.lines().map(str::trim_end).collect::<Vec<_>>().join(" / ");
        match self {
            Event::Total(n) => format!("total {n}"),
            Event::Start(m) => format!("start {}", flat(m)),
            Event::Done(m) => format!("done {}", flat(m)),
            Event::Note(m) => format!("note {}", flat(m)),
        }
    }

    /// Parses a line written by [`Event::encode`]; `None` for anything else.
    pub fn decode(line: &str) -> Option<Event> {
        let (kind, rest) = line.split_once(' ')?;
        match kind {
            "total" => rest.parse().ok().map(Event::Total),
            "start" => Some(Event::Start(rest.to_string())),
            "done" => Some(Event::Done(rest.to_string())),
            "note" => Some(Event::Note(rest.to_string())),
            _ => None,
        }
    }
}

enum Sink {
    Bar(ProgressBar),
    Lines,
    File(File),
}

/// Shows progress on a bar, as plain lines, or by writing events to a file.
pub struct Progress {
    sink: Sink,
    done: u64,
    total: u64,
}

/// Whether stderr can show a redrawn bar: a terminal with a usable TERM.
pub fn stderr_is_fancy() -> bool {
    let term_ok = std::env::var("TERM").is_ok_and(|t| !t.is_empty() && t != "dumb");
    std::io::stderr().is_terminal() && term_ok
}

impl Progress {
    /// Shows progress on stderr: a bar when `fancy`, else plain lines.
    pub fn on_stderr(total: u64, fancy: bool) -> Progress {
        let sink = if fancy {
            let style = ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            Sink::Bar(ProgressBar::new(total).with_style(style))
        } else {
            Sink::Lines
        };
        Progress {
            sink,
            done: 0,
            total,
        }
    }

    /// Writes progress events to `path` (created or truncated) for a follower.
    pub fn to_file(total: u64, path: &Path) -> std::io::Result<Progress> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        let mut p = Progress {
            sink: Sink::File(file),
            done: 0,
            total,
        };
        p.emit(&Event::Total(total));
        Ok(p)
    }

    fn emit(&mut self, event: &Event) {
        if let Sink::File(f) = &mut self.sink {
            // Progress is best effort: a failed write must not fail the benchmark.
            let _ = writeln!(f, "{}", event.encode()).and_then(|()| f.flush());
        }
    }

    /// A run starts.
    pub fn starting(&mut self, what: &str) {
        match &self.sink {
            Sink::Bar(bar) => bar.set_message(what.to_string()),
            Sink::Lines => {}
            Sink::File(_) => self.emit(&Event::Start(what.to_string())),
        }
    }

    /// A run ended with `line` as its result.
    pub fn finished(&mut self, line: &str) {
        self.done += 1;
        let numbered = format!("bench: [{}/{}] {line}", self.done, self.total);
        match &self.sink {
            Sink::Bar(bar) => {
                bar.inc(1);
                bar.println(numbered);
            }
            Sink::Lines => eprintln!("{numbered}"),
            Sink::File(_) => {
                // A failure's details (the console tail) go to stderr, which reaches the
                // user through the test host's console; the event carries the first line.
                let first = line.lines().next().unwrap_or_default();
                if first.len() < line.len() {
                    eprintln!("{numbered}");
                }
                self.emit(&Event::Done(first.to_string()));
            }
        }
    }

    /// Applies an event read from a progress file.
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Total(n) => {
                self.total = n;
                if let Sink::Bar(bar) = &self.sink {
                    bar.set_length(n);
                }
            }
            Event::Start(m) => self.starting(&m),
            Event::Done(m) => self.finished(&m),
            Event::Note(m) => self.note(&m),
        }
    }

    /// Shows a line of information.
    pub fn note(&mut self, line: &str) {
        match &self.sink {
            Sink::Bar(bar) => bar.println(line),
            Sink::Lines => eprintln!("{line}"),
            Sink::File(_) => self.emit(&Event::Note(line.to_string())),
        }
    }

    /// Prints a line on stdout without tearing the bar.
    pub fn print_out(&self, line: &str) {
        match &self.sink {
            Sink::Bar(bar) => bar.suspend(|| println!("{line}")),
            _ => println!("{line}"),
        }
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Sink::Bar(bar) = &self.sink {
            bar.finish_and_clear();
        }
    }
}

/// Reads the complete lines appended to a progress file since the last call.
pub struct Follower {
    file: Option<File>,
    pending: String,
}

impl Follower {
    /// Follows `path`, which may not exist yet.
    pub fn new() -> Follower {
        Follower {
            file: None,
            pending: String::new(),
        }
    }

    /// New events in `path` since the last call.
    pub fn poll(&mut self, path: &Path) -> Vec<Event> {
        if self.file.is_none() {
            self.file = File::open(path).ok();
        }
        let Some(f) = &mut self.file else {
            return Vec::new();
        };
        let mut buf = String::new();
        // A truncation (a new writer) starts over.
        if let (Ok(pos), Ok(meta)) = (f.stream_position(), f.metadata()) {
            if meta.len() < pos {
                let _ = f.seek(SeekFrom::Start(0));
                self.pending.clear();
            }
        }
        if f.read_to_string(&mut buf).is_err() {
            return Vec::new();
        }
        self.pending.push_str(&buf);
        let mut events = Vec::new();
        while let Some(nl) = self.pending.find('\n') {
            let line: String = self.pending.drain(..=nl).collect();
            events.extend(Event::decode(line.trim_end()));
        }
        events
    }
}

impl Default for Follower {
    fn default() -> Self {
        Follower::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_as_single_lines() {
        for e in [
            Event::Total(62),
            Event::Start("boot_ready_ms_1vcpu ours run 1/10".into()),
            Event::Done("boot_ready_ms_1vcpu ours run 1/10: 2001 ms".into()),
            Event::Note("bench: commit abc".into()),
        ] {
            assert_eq!(Event::decode(&e.encode()), Some(e));
        }
        let multi = Event::Done("x FAILED: no ready\nconsole tail:  \n  panic".into());
        assert_eq!(
            multi.encode(),
            "done x FAILED: no ready / console tail: /   panic"
        );
        assert_eq!(Event::decode("garbage"), None);
        assert_eq!(Event::decode("total many"), None);
    }

    #[test]
    fn follower_sees_events_written_to_the_file() {
        let path = std::env::temp_dir().join(format!("bench-progress-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut follower = Follower::new();
        assert!(follower.poll(&path).is_empty(), "no file yet");
        let mut p = Progress::to_file(2, &path).unwrap();
        p.starting("run 1");
        assert_eq!(
            follower.poll(&path),
            vec![Event::Total(2), Event::Start("run 1".into())]
        );
        p.finished("run 1: 5 ms");
        // A partial line is held until its newline arrives.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        write!(f, "done run 2").unwrap();
        assert_eq!(
            follower.poll(&path),
            vec![Event::Done("run 1: 5 ms".into())]
        );
        writeln!(f, ": 6 ms").unwrap();
        assert_eq!(
            follower.poll(&path),
            vec![Event::Done("run 2: 6 ms".into())]
        );
        let _ = std::fs::remove_file(&path);
    }
}
