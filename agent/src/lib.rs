//! The guest agent protocol: what a host-side client (tests, the orchestrator) and the agent
//! in guest-init say to each other over a vsock stream, plus a blocking host-side client.
//!
//! Both ends use this crate, so the wire format is defined once. The protocol does no I/O
//! of its own beyond `Read`/`Write` on a stream the caller hands it; [`connect_hybrid`]
//! opens such a stream on the host through a Firecracker-style hybrid vsock socket, and
//! [`vsock`] holds the guest's AF_VSOCK sockets (guest-init's listener, gtool's clients and
//! servers). The agent itself (the server) lives in guest-init.
//!
//! # Wire format
//!
//! This describes protocol version [`PROTOCOL_VERSION`] = 1.
//!
//! A connection carries a sequence of frames in each direction. A frame is an 8-byte header
//! followed by `len` bytes of payload:
//!
//! | offset | size | field       | value                                                        |
//! |--------|------|-------------|--------------------------------------------------------------|
//! | 0      | 2    | magic       | `b"GA"` (0x47 0x41), [`MAGIC`]                               |
//! | 2      | 1    | wire format | [`WIRE_FORMAT`] = 1: the header layout, bumped only if it changes |
//! | 3      | 1    | frame type  | see [Frame types](#frame-types)                              |
//! | 4      | 4    | len         | payload length in bytes, u32 little endian                   |
//!
//! Limits are checked on the header, before any payload byte is read or allocated:
//! control frames carry at most [`MAX_CONTROL_PAYLOAD`] (1 MiB), data frames (`Stdin`,
//! `Stdout`, `Stderr`) at most [`MAX_DATA_CHUNK`] (64 KiB). A header with the wrong magic or
//! wire format, an unknown or reserved frame type, or a length over its type's limit is a
//! protocol error: the agent answers with an `Error` frame (best effort) and closes the
//! connection. A peer that closes mid-frame is a truncated frame, also fatal.
//!
//! Control payloads are UTF-8 JSON objects. Unknown fields are ignored, so a later version
//! can add optional fields without breaking older peers; a payload that is not valid JSON
//! for its type is a protocol error. Data payloads are raw bytes.
//!
//! ## Frame types
//!
//! | type        | name               | direction     | payload                                         |
//! |-------------|--------------------|---------------|-------------------------------------------------|
//! | 0x01        | `Hello`            | host → agent  | `{"version": 1}`                                |
//! | 0x02        | `HelloOk`          | agent → host  | `{"version": 1, "agent_version": "0.1.0"}`      |
//! | 0x03        | `Error`            | agent → host  | `{"code": "bad_request", "message": "..."}`     |
//! | 0x10        | `Health`           | host → agent  | `{}`                                            |
//! | 0x11        | `HealthOk`         | agent → host  | `{"agent_version": "0.1.0", "uptime_ms": 1234}` |
//! | 0x20        | `Exec`             | host → agent  | [`ExecStart`] as JSON                           |
//! | 0x21        | `Stdin`            | host → agent  | raw bytes; an empty frame ends stdin            |
//! | 0x22        | `Stdout`           | agent → host  | raw bytes, 1..=64 KiB                           |
//! | 0x23        | `Stderr`           | agent → host  | raw bytes, 1..=64 KiB                           |
//! | 0x24        | `Exit`             | agent → host  | [`ExitInfo`] as JSON                            |
//! | 0x30        | `Shutdown`         | host → agent  | `{}`                                            |
//! | 0x31        | `ShutdownOk`       | agent → host  | `{}`                                            |
//! | 0x40        | `Manifest`         | host → agent  | [`ManifestDelivery`] as JSON                    |
//! | 0x41        | `ManifestOk`       | agent → host  | `{"pid": 123}`                                  |
//! | 0x42        | `WorkloadStatus`   | host → agent  | `{}`                                            |
//! | 0x43        | `WorkloadStatusOk` | agent → host  | [`WorkloadStatusOk`] as JSON                    |
//! | 0x44        | `Resync`           | host → agent  | [`ResyncRequest`] as JSON                       |
//! | 0x45        | `ResyncOk`         | agent → host  | [`ResyncReply`] as JSON                         |
//! | 0x46..=0x4f | reserved           |               | manifest                                        |
//! | 0x50..=0x5f | reserved           |               | put / get file                                  |
//! | 0x60        | `Logs`             | host → agent  | `{"offset": 0, "max_bytes": 65536}`             |
//! | 0x61        | `LogsOk`           | agent → host  | `{"start": 0, "end": 42, "dropped": false}`     |
//! | 0x62..=0x6f | reserved           |               | log streaming                                   |
//! | 0x70..=0x7f | reserved           |               | later operations                                |
//!
//! Any other type is unknown. Reserved types are rejected like unknown ones (error code
//! `unsupported` instead of `protocol`) until a protocol version defines them.
//!
//! The manifest, resync and log types (0x40..=0x45, 0x60, 0x61) were added to version 1
//! without a version bump: they only fill reserved slots, and nothing about the older frames
//! changed. An agent built before them answers them with `Error{code: "unsupported"}` and
//! closes the connection, which is how a host tells that such an agent cannot take a
//! manifest (or a resync).
//!
//! ## Conversation
//!
//! 1. **Handshake.** The host's first frame is `Hello{version}`. If the agent speaks that
//!    version it answers `HelloOk{version, agent_version}`, where `version` is the version
//!    used from then on; otherwise it answers `Error{code: "version"}` naming the version it
//!    speaks, and closes. Any other first frame gets `Error{code: "protocol"}` and a close.
//! 2. **Requests**, one at a time: the host sends nothing else until the answer to the
//!    current request is complete.
//!    - `Health` → `HealthOk`. `uptime_ms` counts from guest-init's start.
//!    - `Exec` → (if `stdin` is true, the host then sends `Stdin` frames, the last one
//!      empty) → any number of `Stdout` / `Stderr` frames as output arrives → `Exit`. Or,
//!      instead of any output, an `Error` (the request was refused or the program could not
//!      be started); the connection stays usable after the `Error` of a single request.
//!    - `Manifest` → `ManifestOk`, or an `Error` (the connection stays usable). See
//!      [Manifest and workload](#manifest-and-workload).
//!    - `WorkloadStatus` → `WorkloadStatusOk`.
//!    - `Resync` → `ResyncOk`, or an `Error` (the connection stays usable). See
//!      [Resync](#resync).
//!    - `Logs` → `LogsOk` followed by `Stdout` frames carrying exactly `end - start` bytes
//!      (none when the two are equal), and nothing after them: the byte count in `LogsOk`
//!      says where the answer ends. See [Logs](#logs).
//!    - `Shutdown` → `ShutdownOk`. The host then closes the connection; the agent ends the VM
//!      (sync, then the VM's end action) as soon as it sees the close, or 1 s after the
//!      acknowledgement. Waiting for the close gives the acknowledgement time to leave the
//!      guest before the VM goes away.
//!
//! ## Exec
//!
//! [`ExecStart`] carries `argv`, `env` (pairs), `cwd`, `stdin` (whether `Stdin` frames
//! follow) and `timeout_ms`. The agent:
//! - refuses with `bad_request`: an empty `argv`, an empty program name, NUL bytes
//!   anywhere, an env name that is empty or holds `=`, more than [`MAX_EXEC_ENTRIES`] argv
//!   plus env entries, or more than [`MAX_EXEC_ARGS_BYTES`] of argv and env together (each
//!   string counts its length plus one); stdin beyond [`MAX_EXEC_STDIN`] is `too_large` and
//!   closes the connection;
//! - runs `argv[0]` (looked up in `PATH` when it has no `/`) with an environment of only
//!   `PATH=/bin:/sbin:/usr/bin:/usr/sbin` and `HOME=/`, overridden and extended by `env`, in
//!   `cwd` (default `/`), in a new process group, with stdin from the `Stdin` frames or
//!   `/dev/null`;
//! - **a program that cannot be started** (missing, not executable, bad `cwd`) gets an
//!   `Error{code: "exec_failed"}` naming the OS error, and no `Exit` frame;
//! - streams output in chunks of at most [`MAX_DATA_CHUNK`] as it arrives;
//! - on `timeout_ms`, sends SIGKILL to the whole process group and reports `timed_out`;
//! - after the program exits, forwards what is left in its pipes, and stops waiting for them
//!   once both are closed, or no output came for 200 ms, or 5 s have passed (a background
//!   process that inherited them must not hold the answer back; it keeps running), then
//!   sends `Exit{code, signal, timed_out}`: `code` for a normal exit, `signal` when a signal
//!   ended it;
//! - kills the process group if the host has gone away when it next writes output.
//!
//! The agent serves several connections at once (8 in guest-init today), each with its own
//! exec; a connection over that number gets `Error{code: "busy"}` and is closed.
//!
//! ## Manifest and workload
//!
//! After boot the host sends the full workload manifest over the agent instead of the
//! kernel command line, which is capped at a few KiB: a `Manifest` payload may use the
//! whole [`MAX_CONTROL_PAYLOAD`]. [`ManifestDelivery`] carries:
//! - `vm_id`: 1..=[`MAX_VM_ID`] bytes, no control characters;
//! - `hostname`: 1..=[`MAX_HOSTNAME`] bytes of ASCII letters, digits, `-`, `_` and `.`;
//! - `workload`: `{"argv": [...], "env": [[name, value], ...], "cwd": "/"}`, checked by
//!   the same rules and limits as an `Exec` (so a workload's argv and env together stay
//!   within [`MAX_EXEC_ARGS_BYTES`]);
//! - `manifest`: the full manifest, a JSON object the agent does not interpret.
//!
//! The agent:
//! - refuses with `bad_request` a delivery that breaks those rules, and any `Manifest`
//!   while a workload is running ("a workload is already running"). Once the workload has
//!   exited, a new `Manifest` starts a new one (the host decides whether to restart);
//! - sets the guest's hostname, then writes the `manifest` text, byte for byte as sent, to
//!   `/run/manifest.json` (mode 0600, replaced atomically); a failure here is `internal`;
//! - starts `argv` like an `Exec` (same `PATH` lookup, base environment and `cwd`
//!   default), in its own process group, stdin `/dev/null`, stdout and stderr on one pipe.
//!   A program that cannot be started is `exec_failed`. Otherwise it answers
//!   `ManifestOk{pid}`;
//! - keeps the workload's output in memory (the last [`LOG_RING_SIZE`] bytes at least) for
//!   `Logs`, and copies it as is to the guest console, best effort: output the console
//!   cannot keep up with is left out there (it is still in the log) and a note says how
//!   much;
//! - records how the workload ended, for `WorkloadStatus`. The VM keeps running when the
//!   workload exits: what happens next is the host's decision.
//!
//! The workload runs independently of the connection that started it: closing the
//! connection does not stop it, and any connection may ask for its status or logs.
//!
//! [`WorkloadStatusOk`] is `{"state": "none" | "running" | "exited", "pid", "code",
//! "signal"}`: `pid` once a workload was started, `code` after a normal exit, `signal` when a
//! signal ended it (absent or `null` otherwise). It describes the latest workload.
//!
//! ## Resync
//!
//! A VM restored from a snapshot (woken from hibernation, or a clone of a template) resumes
//! with the snapshot's clock, the snapshot's kernel RNG state (shared with every other
//! clone) and the snapshot's hostname. The host sends `Resync` right after the restore.
//! [`ResyncRequest`] is `{"unix_time_ns": u64, "seed": "<hex>", "hostname": "..."}`:
//! - `unix_time_ns`: the host's realtime clock, nanoseconds since the Unix epoch;
//! - `seed`: [`MIN_RESYNC_SEED`]..=[`MAX_RESYNC_SEED`] bytes of fresh randomness as hex (an
//!   even number of digits, either case); [`ResyncRequest::now`] draws 32 from the host's
//!   `getrandom`;
//! - `hostname` (optional, absent or `null` to keep the current one): 1..=[`MAX_HOSTNAME`]
//!   ASCII letters, digits, `-` and `.`.
//!
//! The agent:
//! - refuses with `bad_request` a request that breaks those rules, before changing anything;
//! - sets `CLOCK_REALTIME` to `unix_time_ns` (a failure is `internal`);
//! - adds the seed to the kernel's entropy pool with the `RNDADDENTROPY` ioctl on
//!   `/dev/urandom`, crediting 8 bits per byte; if the ioctl fails it writes the seed to
//!   `/dev/urandom` instead, which mixes it in without credit (a failure of both is
//!   `internal`);
//! - sets the hostname when one is given (a failure is `internal`);
//! - answers [`ResyncReply`]: `{"clock_step_ms": i64, "entropy_credited": bool,
//!   "hostname": "..."}`, where `clock_step_ms` is the new realtime minus the old one
//!   (positive when the guest was behind), `entropy_credited` is false when the fallback
//!   write was used, and `hostname` is the guest's hostname afterwards.
//!
//! The steps run in that order; an `internal` error leaves the earlier ones done.
//!
//! ## Logs
//!
//! The log is one byte stream of everything the workloads wrote to stdout and stderr, in
//! the order the agent read it. An offset counts bytes from the start of the first
//! workload; a workload started after an earlier one exited appends to the same stream,
//! so offsets never go back. `Logs{offset, max_bytes}` asks for the bytes from `offset`:
//! - `max_bytes` is capped at [`MAX_LOG_READ`];
//! - if the agent no longer holds `offset` (it keeps only the newest [`LOG_RING_SIZE`]
//!   bytes), the answer starts at the oldest byte it holds and sets `dropped`;
//! - an `offset` past the end of the log is answered as the end: `start == end`, nothing
//!   follows;
//! - `LogsOk{start, end, dropped}` is followed by the `end - start` bytes in `Stdout`
//!   frames of 1..=[`MAX_DATA_CHUNK`] bytes each. To follow the log, ask again from `end`.
//!
//! ## Errors
//!
//! `Error` carries an [`ErrorCode`] and a human-readable message. The agent closes the
//! connection after `protocol`, `version`, `too_large`, `unsupported` and `busy`; after
//! `bad_request`, `exec_failed` and `internal` it waits for the next request.

#![warn(missing_docs)]

mod client;
mod frame;
mod hybrid;
mod message;
pub mod vsock;

pub use client::{
    AgentClient, AgentError, ExecRequest, ExecResult, LogChunk, OutputStream, DEFAULT_OUTPUT_LIMIT,
    MAX_REMOTE_MESSAGE,
};
pub use frame::{
    decode_frame, decode_header, encode_frame, encode_header, read_frame, write_frame, Frame,
    FrameError, FrameType, Header,
};
pub use hybrid::{connect_hybrid, MAX_HYBRID_LINE};
pub use message::{
    read_message, write_message, ErrorCode, ErrorInfo, ExecStart, ExitInfo, Health, HealthOk,
    Hello, HelloOk, LogsOk, LogsRequest, ManifestDelivery, ManifestOk, Message, RawManifest,
    ResyncReply, ResyncRequest, Shutdown, ShutdownOk, WorkloadSpec, WorkloadState, WorkloadStatus,
    WorkloadStatusOk, RESYNC_SEED_LEN,
};

/// First two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"GA";

/// Layout of the frame header. Bumped only if the header itself changes; the meaning of
/// frames is versioned by [`PROTOCOL_VERSION`].
pub const WIRE_FORMAT: u8 = 1;

/// The protocol version this crate speaks, exchanged in `Hello` / `HelloOk`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 8;

/// Largest payload of a control (JSON) frame.
pub const MAX_CONTROL_PAYLOAD: usize = 1024 * 1024;

/// Largest payload of a data frame (`Stdin`, `Stdout`, `Stderr`).
pub const MAX_DATA_CHUNK: usize = 64 * 1024;

/// Largest total stdin of one exec.
pub const MAX_EXEC_STDIN: usize = 4 * 1024 * 1024;

/// Largest total size of an exec's argv and env: each string counts its length plus one.
pub const MAX_EXEC_ARGS_BYTES: usize = 256 * 1024;

/// Most argv plus env entries in one exec.
pub const MAX_EXEC_ENTRIES: usize = 4096;

/// Longest `cwd` of an exec (Linux's PATH_MAX).
pub const MAX_EXEC_CWD: usize = 4096;

/// Longest hostname in a manifest or a resync (Linux's HOST_NAME_MAX).
pub const MAX_HOSTNAME: usize = 64;

/// Fewest seed bytes a `Resync` may carry.
pub const MIN_RESYNC_SEED: usize = 32;

/// Most seed bytes a `Resync` may carry.
pub const MAX_RESYNC_SEED: usize = 256;

/// Longest `vm_id` in a manifest.
pub const MAX_VM_ID: usize = 256;

/// Most log bytes one `Logs` request returns; a larger `max_bytes` is capped to this.
pub const MAX_LOG_READ: usize = 1024 * 1024;

/// How much of the workload's output the agent keeps: at least the last this many bytes.
pub const LOG_RING_SIZE: usize = 1024 * 1024;
