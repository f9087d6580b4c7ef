//! The one place that collects children's exit statuses.
//!
//! As PID 1, guest-init is the parent of last resort: every orphan in the guest becomes its
//! child and must be reaped, or zombies pile up. Yet the workload command and each agent
//! exec need their *own* statuses. So one reaper thread waits for any child and routes each
//! status to whoever registered that pid; unregistered children (orphans) are reaped and
//! forgotten.
//!
//! The race to close is a child that exits before its pid is registered. Spawning and
//! registering happen under the reaper's lock, and the reaper thread reaps only under that
//! lock, after `waitid(WNOWAIT)` told it a child is ready without reaping it. So a child is
//! never reaped before its waiter is known. The same lock keeps the reaper off a child whose
//! exec failed: std (and glibc's posix_spawn) reap that child themselves inside `spawn()`,
//! and std panics if someone else got there first.
//!
//! Rule for the rest of guest-init: start children only through [`Reaper::spawn`], and never
//! call `Child::wait`, `try_wait`, `output` or `status`, which would steal the status.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Called once with the raw wait status when the child exits. It runs on the reaper thread
/// and must not block (send on a channel, set a flag).
pub type OnExit = Box<dyn FnOnce(libc::c_int) + Send>;

#[derive(Default)]
struct State {
    waiters: HashMap<libc::pid_t, OnExit>,
    /// Bumped on every spawn, so the reaper can sleep while there are no children.
    generation: u64,
}

/// Routes exit statuses to the code that started each child. See the module docs.
#[derive(Default)]
pub struct Reaper {
    state: Mutex<State>,
    spawned: Condvar,
}

impl Reaper {
    /// A reaper with no thread yet; see [`Reaper::start`].
    pub fn new() -> Reaper {
        Reaper::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map inconsistent (each operation
        // is a single insert or remove), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the reaper thread. Call once.
    pub fn start(self: &Arc<Self>) -> io::Result<()> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || me.run())?;
        Ok(())
    }

    /// Spawns `cmd` and registers `on_exit` for it, atomically with respect to the reaper.
    /// Returns the child (for its pipes; never wait on it) and its pid.
    pub fn spawn(&self, cmd: &mut Command, on_exit: OnExit) -> io::Result<(Child, libc::pid_t)> {
        let mut state = self.lock();
        let child = cmd.spawn()?;
        // Linux pids fit in pid_t (pid_max is at most 2^22), so this cannot fail; if it did,
        // the child would be reaped as an orphan.
        let pid = libc::pid_t::try_from(child.id())
            .map_err(|_| io::Error::other("child pid out of range"))?;
        state.waiters.insert(pid, on_exit);
        state.generation = state.generation.wrapping_add(1);
        drop(state);
        self.spawned.notify_all();
        Ok((child, pid))
    }

    /// Removes the waiters of the reaped `(pid, status)` pairs and returns them with their
    /// statuses, to be called once the lock is released.
    fn take_waiters(
        state: &mut State,
        reaped: &[(libc::pid_t, libc::c_int)],
    ) -> Vec<(OnExit, libc::c_int)> {
        reaped
            .iter()
            .filter_map(|(pid, status)| state.waiters.remove(pid).map(|w| (w, *status)))
            .collect()
    }

    fn run(&self) {
        loop {
            let generation = self.lock().generation;
            match wait_any() {
                Ok(()) => self.reap_ready(),
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                    // No children at all. A new one can only come from a spawn (an orphan is
                    // re-parented to us only while one of our children is alive), so sleep
                    // until the next spawn.
                    let state = self.lock();
                    let _state = self
                        .spawned
                        .wait_while(state, |s| s.generation == generation)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // Nothing else is documented for these arguments; do not spin on it.
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Reaps every child that has exited, under the lock, and calls their waiters.
    fn reap_ready(&self) {
        let mut state = self.lock();
        let mut reaped = Vec::new();
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: status is a valid out-pointer for the duration of the call.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                // 0: the rest are still running; -1: ECHILD (or EINTR: waitid will wake us
                // again for anything left).
                break;
            }
            reaped.push((pid, status));
        }
        let calls = Reaper::take_waiters(&mut state, &reaped);
        drop(state);
        for (on_exit, status) in calls {
            on_exit(status);
        }
    }
}

/// Blocks until some child has exited, without reaping it.
fn wait_any() -> io::Result<()> {
    // SAFETY: siginfo_t is plain data; all-zero is a valid value to be overwritten.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: info is a valid out-pointer for the call; WNOWAIT leaves the child waitable.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The reaper shared by every test in this binary that starts a child: two reapers (or a
/// reaper and a `Child::wait`) in one process would steal each other's statuses.
#[cfg(test)]
pub fn test_reaper() -> Arc<Reaper> {
    static REAPER: std::sync::OnceLock<Arc<Reaper>> = std::sync::OnceLock::new();
    Arc::clone(REAPER.get_or_init(|| {
        let r = Arc::new(Reaper::new());
        r.start().expect("start the test reaper");
        r
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::shell_status;
    use std::sync::mpsc;
    use std::time::Instant;

    fn sender_waiter(tx: &mpsc::Sender<(&'static str, libc::c_int)>, name: &'static str) -> OnExit {
        let tx = tx.clone();
        Box::new(move |status| {
            let _ = tx.send((name, status));
        })
    }

    #[test]
    fn routing_delivers_each_status_once_to_its_own_waiter() {
        // Pure routing, no processes: register fake pids, then feed statuses as the reaper
        // thread would.
        let reaper = Reaper::new();
        let (tx, rx) = mpsc::channel();
        {
            let mut s = reaper.lock();
            s.waiters.insert(100, sender_waiter(&tx, "cmd"));
            s.waiters.insert(200, sender_waiter(&tx, "exec"));
        }
        let route = |reaped: &[(libc::pid_t, libc::c_int)]| {
            let calls = Reaper::take_waiters(&mut reaper.lock(), reaped);
            for (w, s) in calls {
                w(s);
            }
        };
        // An orphan (300) is dropped; 200 and 100 each get their own status.
        route(&[(300, 1 << 8), (200, 3 << 8)]);
        assert_eq!(rx.try_recv().unwrap(), ("exec", 3 << 8));
        assert!(rx.try_recv().is_err());
        route(&[(200, 9)]); // a second status for 200 (pid reused later) goes nowhere
        assert!(rx.try_recv().is_err());
        route(&[(100, 0)]);
        assert_eq!(rx.try_recv().unwrap(), ("cmd", 0));
        assert!(reaper.lock().waiters.is_empty());
    }

    #[test]
    fn real_children_are_routed_by_pid() {
        let reaper = test_reaper();
        let (tx, rx) = mpsc::channel();
        let mut slow = Command::new("sh");
        slow.args(["-c", "sleep 0.2; exit 5"]);
        let (_c1, slow_pid) = reaper.spawn(&mut slow, sender_waiter(&tx, "slow")).unwrap();
        let mut fast = Command::new("sh");
        fast.args(["-c", "exit 7"]);
        let (_c2, fast_pid) = reaper.spawn(&mut fast, sender_waiter(&tx, "fast")).unwrap();
        assert_ne!(slow_pid, fast_pid);
        let t = Duration::from_secs(10);
        let (name, status) = rx.recv_timeout(t).unwrap();
        assert_eq!((name, shell_status(status)), ("fast", (7, None)));
        let (name, status) = rx.recv_timeout(t).unwrap();
        assert_eq!((name, shell_status(status)), ("slow", (5, None)));
    }

    #[test]
    fn child_exiting_at_once_is_not_lost() {
        // `true` may exit before spawn() returns; the lock makes the reaper wait for the
        // registration.
        let reaper = test_reaper();
        let (tx, rx) = mpsc::channel();
        for _ in 0..50 {
            reaper
                .spawn(&mut Command::new("true"), sender_waiter(&tx, "t"))
                .unwrap();
        }
        for _ in 0..50 {
            let (_, status) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(shell_status(status), (0, None));
        }
    }

    #[test]
    fn failed_exec_is_an_error_not_a_panic() {
        // std reaps a child whose exec failed inside spawn(); the reaper must not race it.
        let reaper = test_reaper();
        for _ in 0..20 {
            let err = reaper
                .spawn(
                    &mut Command::new("/nonexistent/program"),
                    Box::new(|_| panic!("a child that never ran has no waiter")),
                )
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::NotFound);
        }
    }

    #[test]
    fn orphans_are_reaped() {
        // Make this test process the orphans' parent, as PID 1 is in the guest.
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER only sets a flag on this process.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(rc, 0);
        let reaper = test_reaper();
        let (tx, rx) = mpsc::channel();
        let mut cmd = Command::new("sh");
        let pidfile = std::env::temp_dir().join(format!("gi-orphan-{}", std::process::id()));
        cmd.args(["-c", "sleep 0.1 & echo $! > \"$0\""])
            .arg(&pidfile);
        let _ = reaper.spawn(&mut cmd, sender_waiter(&tx, "sh")).unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let orphan = std::fs::read_to_string(&pidfile).unwrap();
        let _ = std::fs::remove_file(&pidfile);
        let stat = format!("/proc/{}/stat", orphan.trim());
        let deadline = Instant::now() + Duration::from_secs(10);
        // Gone from /proc means reaped; a zombie would stay with state Z.
        while std::path::Path::new(&stat).exists() {
            assert!(Instant::now() < deadline, "orphan {orphan} was not reaped");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
