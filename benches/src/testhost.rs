//! The outer side of a harness run inside the KVM test host (`tests/testhost/run`): pass
//! the test host's console on, show the inner harness's progress as it happens, and stop a
//! test host that has stopped making progress.
//!
//! The test host is a QEMU TCG machine on the same few cores as everything else. When the
//! machine is loaded (another test host, a build, a fuzzer), its kernel has been seen to
//! wedge for good (soft lockups), with the inner harness's own per-VM timeout never firing.
//! The outer side therefore watches the progress file: with no event for `stall_limit`, it
//! ends the test host's qemu (a process this harness started, found among its child's
//! descendants by id), and the test host reports the failure.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::progress::{self, Follower, Progress};

/// `(pid, comm, ppid)` from the text of `/proc/PID/stat`. The command name is in
/// parentheses and may itself hold spaces and parentheses, so it ends at the last `)`.
pub fn parse_stat(text: &str) -> Option<(u32, String, u32)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let comm = text.get(open + 1..close)?.to_string();
    let mut rest = text.get(close + 1..)?.split_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((pid, comm, ppid))
}

/// Every live descendant of `root` as `(pid, comm)`, from /proc.
pub fn descendants(root: u32) -> Vec<(u32, String)> {
    let mut all = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let stat = entry.path().join("stat");
            if let Some(p) = std::fs::read_to_string(stat)
                .ok()
                .as_deref()
                .and_then(parse_stat)
            {
                all.push(p);
            }
        }
    }
    let mut found: Vec<(u32, String)> = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for (pid, comm, ppid) in &all {
            if *ppid == parent && !found.iter().any(|(p, _)| p == pid) {
                found.push((*pid, comm.clone()));
                frontier.push(*pid);
            }
        }
    }
    found
}

/// Sends SIGTERM to the test host's qemu among `root`'s descendants; returns their pids.
fn stop_testhost_qemu(root: u32) -> Vec<u32> {
    let mut stopped = Vec::new();
    for (pid, comm) in descendants(root) {
        // comm is cut to 15 characters: "qemu-system-x86".
        if !comm.starts_with("qemu-system") {
            continue;
        }
        let Ok(id) = libc::pid_t::try_from(pid) else {
            continue;
        };
        // SAFETY: kill(2) with a positive pid signals that one process, a descendant of the
        // test host runner this harness started; no memory is involved.
        if unsafe { libc::kill(id, libc::SIGTERM) } == 0 {
            stopped.push(pid);
        }
    }
    stopped
}

fn lock(s: &Mutex<Shown>) -> MutexGuard<'_, Shown> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

struct Shown {
    follower: Follower,
    progress: Progress,
    last_event: Instant,
}

impl Shown {
    fn catch_up(&mut self, path: &Path) {
        for event in self.follower.poll(path) {
            self.last_event = Instant::now();
            self.progress.apply(event);
        }
    }
}

/// How a relayed test host run ended.
#[derive(Debug)]
pub struct Relayed {
    /// The test host runner's exit status.
    pub status: ExitStatus,
    /// The stall watchdog stopped it.
    pub stalled: bool,
}

/// Passes `child`'s stdout (the test host's console: the inner harness's stdout and stderr)
/// on to stdout while showing the inner harness's progress from `progress_file`, until the
/// test host ends; returns its status. Stops the test host after `stall_limit` without a
/// progress event.
pub fn relay(child: &mut Child, progress_file: &Path, stall_limit: Duration) -> Result<Relayed> {
    let shown = Arc::new(Mutex::new(Shown {
        follower: Follower::new(),
        progress: Progress::on_stderr(0, progress::stderr_is_fancy()),
        last_event: Instant::now(),
    }));
    let done = Arc::new(AtomicBool::new(false));
    let stalled = Arc::new(AtomicBool::new(false));
    let poller = {
        let (shown, done, stalled) = (Arc::clone(&shown), Arc::clone(&done), Arc::clone(&stalled));
        let path: PathBuf = progress_file.to_path_buf();
        let root = child.id();
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let mut s = lock(&shown);
                s.catch_up(&path);
                if s.last_event.elapsed() > stall_limit {
                    stalled.store(true, Ordering::Relaxed);
                    let stopped = stop_testhost_qemu(root);
                    s.progress.note(&format!(
                        "bench: no progress from the test host for {} s: its kernel is probably wedged (seen when other test hosts or builds load the machine); stopped its qemu (pid {stopped:?})",
                        stall_limit.as_secs()
                    ));
                    s.last_event = Instant::now();
                }
                drop(s);
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    // Before each console line goes on, the progress file is read up to date, so progress
    // and console output keep the order the inner harness wrote them in.
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let mut s = lock(&shown);
            s.catch_up(progress_file);
            s.progress.print_out(&line);
        }
    }
    let status = child.wait().context("waiting for tests/testhost/run");
    done.store(true, Ordering::Relaxed);
    let _ = poller.join();
    let mut s = lock(&shown);
    s.catch_up(progress_file);
    s.progress.finish();
    Ok(Relayed {
        status: status?,
        stalled: stalled.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_with_odd_command_names() {
        assert_eq!(
            parse_stat("1234 (qemu-system-x86) S 1200 1234 1200 0 -1 4194560"),
            Some((1234, "qemu-system-x86".into(), 1200))
        );
        assert_eq!(
            parse_stat("7 (a) b) (c) R 1 7 7"),
            Some((7, "a) b) (c".into(), 1))
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn descendants_include_grandchildren() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut found = Vec::new();
        while Instant::now() < deadline {
            found = descendants(child.id());
            if found.iter().any(|(_, c)| c == "sleep") {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let sleep = found.iter().find(|(_, c)| c == "sleep").map(|(p, _)| *p);
        if let Some(pid) = sleep.and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: signals the sleep this test started, by its id.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = child.wait();
        assert!(sleep.is_some(), "no sleep among {found:?}");
    }
}
