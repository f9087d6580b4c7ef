//! Accepting agent connections: one thread runs the accept loop, each connection gets its
//! own thread, and at most [`MAX_CONNECTIONS`] run at once (more are told `busy`).

use std::fmt::Display;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent::vsock::{VsockListener, VsockStream};
use agent::ErrorCode;

use super::{send_error, serve, shorten, ServerContext};

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 8;

/// Connection errors printed on the console before the rest are silenced: a host must not be
/// able to flood the guest console.
const MAX_LOGGED_ERRORS: usize = 20;

/// Backlog of the agent's vsock listener: connections the host opened that the accept loop
/// has not taken yet.
pub const BACKLOG: u32 = 16;

/// A source of connections: the vsock listener in the guest, a unix listener in tests.
pub trait Listener: Send + 'static {
    /// One accepted connection.
    type Stream: Read + Write + Send + 'static;
    /// Blocks until a host connects.
    fn accept(&self) -> io::Result<Self::Stream>;
}

impl Listener for VsockListener {
    type Stream = VsockStream;
    fn accept(&self) -> io::Result<VsockStream> {
        VsockListener::accept(self)
    }
}

#[cfg(test)]
impl Listener for std::os::unix::net::UnixListener {
    type Stream = std::os::unix::net::UnixStream;
    fn accept(&self) -> io::Result<Self::Stream> {
        std::os::unix::net::UnixListener::accept(self).map(|(s, _)| s)
    }
}

fn log_error(what: &str, err: &dyn Display) {
    static LOGGED: AtomicUsize = AtomicUsize::new(0);
    let n = LOGGED.fetch_add(1, Ordering::Relaxed);
    if n < MAX_LOGGED_ERRORS {
        let text = err.to_string();
        crate::say(format_args!("agent: {what}: {}", shorten(&text, 200)));
    } else if n == MAX_LOGGED_ERRORS {
        crate::say(format_args!("agent: further errors are not printed"));
    }
}

/// Counts a running connection; decrements when the connection's thread ends (or was never
/// started).
struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Starts the accept loop on its own thread.
pub fn spawn_accept_loop<L: Listener>(listener: L, ctx: Arc<ServerContext>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("agent-accept".into())
        .spawn(move || accept_loop(&listener, &ctx))?;
    Ok(())
}

fn accept_loop<L: Listener>(listener: &L, ctx: &Arc<ServerContext>) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let mut stream = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // ECONNABORTED, EMFILE, ENOMEM...: keep serving, but do not spin.
                log_error("accept", &e);
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            send_error(
                &mut stream,
                ErrorCode::Busy,
                &format!("already serving {MAX_CONNECTIONS} connections"),
            );
            continue;
        }
        let guard = Active(Arc::clone(&active));
        let ctx = Arc::clone(ctx);
        let started = std::thread::Builder::new()
            .name("agent-conn".into())
            .spawn(move || {
                let _guard = guard;
                if let Err(e) = serve(&mut stream, &ctx) {
                    log_error("connection", &e);
                }
            });
        // On failure the closure, with the stream and the guard, is dropped: the host sees
        // the connection close.
        if let Err(e) = started {
            log_error("starting a connection thread", &e);
        }
    }
}
