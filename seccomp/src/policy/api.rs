//! The `vmm_api` thread's policy, on top of `common`. Its filter goes in when the thread
//! starts serving: the socket is bound, and the tokio runtime (epoll, its waker eventfd)
//! built, before. What is left is accepting clients on the listening socket, reading
//! requests and writing answers, tokio's epoll and timers, and handing each request to
//! the main thread (a channel and an eventfd write). It touches neither KVM nor a file.

use super::{eq, u32_of, Policy};

pub(super) fn add(p: &mut Policy) {
    // tokio's reactor (mio): wait for readiness with a timeout (its timers), register and
    // deregister each connection.
    p.allow(libc::SYS_epoll_wait);
    p.allow(libc::SYS_epoll_pwait);
    p.allow(libc::SYS_epoll_ctl);
    // mio accepts clients non-blocking and close-on-exec.
    p.allow_if(
        libc::SYS_accept4,
        vec![vec![eq(
            3,
            u32_of(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK),
        )]],
    );
    // Requests are read, answers written (hyper writes head and body in one writev);
    // tokio's waker eventfd is read back after a wake-up.
    p.allow(libc::SYS_read);
    p.allow(libc::SYS_recvfrom);
    p.allow(libc::SYS_writev);
    p.allow(libc::SYS_sendto);
    // hyper half-closes a connection it is done with.
    p.allow(libc::SYS_shutdown);
    // mio asks a socket's pending error when epoll reports one.
    p.allow(libc::SYS_getsockopt);
    // std's HashMap (in axum's router) seeds its hasher from the kernel; tokio seeds its
    // scheduler's RNG the same way.
    p.allow(libc::SYS_getrandom);
}
