//! The main thread's policy, on top of `common`. Its filter goes in once the VM is built
//! (or restored) and its vCPU threads exist, so setup (opening the kernel, disks, taps,
//! /dev/kvm, creating the VM, its memory and its devices, spawning threads) is not part
//! of it. What is left is the event loop and the API's actions:
//! - the loop: epoll over eventfds, the signalfd, timerfds, taps and unix sockets;
//! - virtio-blk (preadv/pwritev/fdatasync), virtio-net (tap read/writev, offloads),
//!   virtio-vsock (unix sockets: accept host clients, connect to `PATH_port`), virtio-rng
//!   (getrandom), console input (stdin);
//! - pause/resume (kick the vCPUs, kvmclock), snapshot create (KVM_GET_* of the VM, the
//!   memory and vmstate files written and renamed into place), and the end (join the
//!   threads, remove the API socket).

use super::ioctls::*;
use super::{eq, one_of, u32_of, Policy};

/// std's `File::open`: read-only, close-on-exec.
const OPEN_READ: u32 = u32_of(libc::O_RDONLY | libc::O_CLOEXEC);
/// std's `OpenOptions::new().write(true).create(true).truncate(true)`.
const OPEN_CREATE: u32 = u32_of(libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC);

pub(super) fn add(p: &mut Policy) {
    // The event loop (event-manager and the paused loop's own epoll set): wait, and add
    // or remove fds as devices activate and vsock connections come and go.
    p.allow(libc::SYS_epoll_wait);
    p.allow(libc::SYS_epoll_pwait);
    p.allow(libc::SYS_epoll_ctl);
    // Eventfds, the signalfd, timerfds, stdin, taps and vsock streams are read; and
    // files (snapshot vmstate, console) written with write (in `common`).
    p.allow(libc::SYS_read);
    // virtio-net transmits a frame gathered from guest memory in one writev; std's
    // vectored writes on sockets use it too.
    p.allow(libc::SYS_writev);
    // virtio-blk reads and writes a request's buffers at its offset on the disk image in
    // one preadv/pwritev; the snapshot writes memory pages at their offset and reads
    // /proc/self/pagemap (pwrite64/pread64).
    p.allow(libc::SYS_preadv);
    p.allow(libc::SYS_pwritev);
    p.allow(libc::SYS_pread64);
    p.allow(libc::SYS_pwrite64);
    // virtio-blk FLUSH (fdatasync); snapshot files and their directory (fsync).
    p.allow(libc::SYS_fdatasync);
    p.allow(libc::SYS_fsync);
    // virtio-rng fills guest buffers from the kernel's CSPRNG; std's HashMap seeds.
    p.allow(libc::SYS_getrandom);
    // KVM requests of the running VMM, on the VM fd: kvmclock saved at pause and written
    // back at resume; the irqchip, PIT and clock saved by a snapshot. On taps:
    // TUNSETOFFLOAD when the guest's virtio-net driver negotiates its offloads. On unix
    // sockets: FIONBIO, std's set_nonblocking, for each accepted vsock host client.
    p.allow_if(
        libc::SYS_ioctl,
        one_of(
            1,
            &[
                KVM_GET_CLOCK,
                KVM_SET_CLOCK,
                KVM_GET_IRQCHIP,
                KVM_GET_PIT2,
                TUNSETOFFLOAD,
                FIONBIO,
            ],
        ),
    );
    // virtio-vsock, guest to host: a guest connection to CID 2 port P connects a new
    // non-blocking unix stream socket to `PATH_P`. Only that kind of socket.
    p.allow_if(
        libc::SYS_socket,
        vec![vec![
            eq(0, u32_of(libc::AF_UNIX)),
            eq(
                1,
                u32_of(libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC),
            ),
        ]],
    );
    p.allow(libc::SYS_connect);
    // virtio-vsock, host to guest: accept host clients on the device's listening socket
    // (std's accept, close-on-exec).
    p.allow_if(
        libc::SYS_accept4,
        vec![vec![eq(3, u32_of(libc::SOCK_CLOEXEC))]],
    );
    // virtio-vsock streams: send with MSG_NOSIGNAL, recv, half-close on guest shutdown,
    // and the connect's pending error.
    p.allow(libc::SYS_sendto);
    p.allow(libc::SYS_recvfrom);
    p.allow(libc::SYS_shutdown);
    p.allow(libc::SYS_getsockopt);
    // virtio-vsock's timer (credit updates, connection timeouts) is re-armed.
    p.allow(libc::SYS_timerfd_settime);
    p.allow(libc::SYS_timerfd_gettime);
    // Duplicated fds (EventFd::try_clone: dup) and file status flags (a non-blocking
    // timerfd). Seen at setup only; kept for devices that re-create them at run time.
    p.allow_if(
        libc::SYS_fcntl,
        one_of(
            1,
            &[
                u32_of(libc::F_GETFL),
                u32_of(libc::F_SETFL),
                u32_of(libc::F_SETFD),
                u32_of(libc::F_DUPFD_CLOEXEC),
            ],
        ),
    );
    p.allow(libc::SYS_dup);
    // Snapshot create: /proc/self/pagemap and the directory to fsync are opened
    // read-only; the memory and vmstate files are created (as `PATH.tmp`), sized, and
    // renamed into place; a failed write removes its temporary file. Nothing else is
    // opened after setup, and never for writing without create+truncate.
    p.allow_if(libc::SYS_openat, one_of(2, &[OPEN_READ, OPEN_CREATE]));
    p.allow(libc::SYS_ftruncate);
    p.allow(libc::SYS_rename);
    // Snapshot: which pages of guest memory are resident (mincore) and, for a restored
    // VM, which ranges of its memory file hold data (lseek SEEK_DATA/SEEK_HOLE).
    p.allow(libc::SYS_mincore);
    p.allow(libc::SYS_lseek);
    // File metadata: at the end the API socket's identity is checked before it is
    // removed. std asks statx, and falls back to fstat/newfstatat where statx is refused.
    p.allow(libc::SYS_statx);
    p.allow(libc::SYS_fstat);
    p.allow(libc::SYS_newfstatat);
    // At the end the API socket is removed; a failed snapshot removes its temporary file.
    p.allow(libc::SYS_unlink);
    // Kicking the vCPUs out of KVM_RUN (pause, snapshot, stop): the real-time kick signal,
    // SIGRTMIN, which glibc reserves nothing of (vmm_sys_util's SIGRTMIN is libc's).
    p.allow_if(
        libc::SYS_tgkill,
        vec![vec![eq(2, u32_of(libc::SIGRTMIN()))]],
    );
    // Stopping the vCPUs waits between kicks (thread::sleep: glibc's nanosleep is
    // clock_nanosleep; older ones call nanosleep).
    p.allow(libc::SYS_clock_nanosleep);
    p.allow(libc::SYS_nanosleep);
}
