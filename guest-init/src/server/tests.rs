//! The agent end to end over a unix socket pair: the real server and the real client of the
//! `agent` crate, with real child processes (through the test binary's shared reaper).

use super::listen::{spawn_accept_loop, MAX_CONNECTIONS};
use super::*;
use crate::reaper::test_reaper;
use crate::workload::tests::{delivery, scratch_dir, test_config};
use crate::workload::{WorkloadConfig, MANIFEST_FILE};
use agent::{
    encode_header, read_message, write_frame, AgentClient, AgentError, ExecRequest, ExecStart,
    FrameType, Hello, Message, RawManifest, WorkloadState, LOG_RING_SIZE, MAX_CONTROL_PAYLOAD,
    MAX_DATA_CHUNK,
};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

struct Conn {
    stream: UnixStream,
    server: JoinHandle<Result<(), ServeError>>,
    stages: mpsc::Receiver<ShutdownStage>,
}

fn context() -> (ServerContext, mpsc::Receiver<ShutdownStage>) {
    // Nothing is written unless a test sends a manifest, which these tests do not.
    context_with(WorkloadConfig {
        run_dir: scratch_dir("srv-unused"),
        set_hostname: false,
        console: None,
        log_capacity: LOG_RING_SIZE,
    })
}

fn context_with(config: WorkloadConfig) -> (ServerContext, mpsc::Receiver<ShutdownStage>) {
    let (tx, rx) = mpsc::channel();
    let ctx = ServerContext {
        reaper: test_reaper(),
        started: Instant::now(),
        on_shutdown: Box::new(move |stage| {
            let _ = tx.send(stage);
        }),
        workload: Workload::new(config, test_reaper()),
        // Resync must not touch the host's clock, entropy pool or hostname.
        machine: Box::new(super::resync::tests::FakeMachine::new(
            1_600_000_000_000_000_000,
            "fake-guest",
        )),
    };
    (ctx, rx)
}

/// A client past the handshake on a connection to a shared context.
fn client_on(ctx: &Arc<ServerContext>) -> AgentClient<UnixStream> {
    let (stream, mut server_end) = UnixStream::pair().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let ctx = Arc::clone(ctx);
    thread::spawn(move || serve(&mut server_end, &ctx));
    let mut c = AgentClient::new(stream);
    c.hello().unwrap();
    c
}

fn open() -> Conn {
    let (stream, mut server_end) = UnixStream::pair().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let (ctx, stages) = context();
    let server = thread::spawn(move || serve(&mut server_end, &ctx));
    Conn {
        stream,
        server,
        stages,
    }
}

/// A connection past the handshake, with a client on it.
fn client() -> (AgentClient<UnixStream>, Conn) {
    let conn = open();
    let mut c = AgentClient::new(conn.stream.try_clone().unwrap());
    let ok = c.hello().unwrap();
    assert_eq!(ok.version, PROTOCOL_VERSION);
    assert_eq!(ok.agent_version, AGENT_VERSION);
    (c, conn)
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

fn remote_code(e: AgentError) -> ErrorCode {
    match e {
        AgentError::Remote { code, .. } => code,
        other => panic!("expected an agent error, got {other}"),
    }
}

/// Expects an `Error` frame with `code`, then the connection closed by the agent.
fn expect_error_then_close(conn: Conn, code: ErrorCode) {
    let mut s = conn.stream;
    match read_message(&mut s).unwrap() {
        Message::Error(e) => assert_eq!(e.code, code, "{}", e.message),
        other => panic!("expected an Error frame, got {other:?}"),
    }
    assert!(matches!(read_message(&mut s), Err(FrameError::Closed)));
    assert!(conn.server.join().unwrap().is_err());
}

#[test]
fn hello_then_health() {
    let (mut c, conn) = client();
    let h = c.health().unwrap();
    assert_eq!(h.agent_version, AGENT_VERSION);
    assert!(h.uptime_ms < 60_000);
    drop(c);
    drop(conn.stream);
    assert!(conn.server.join().unwrap().is_ok());
}

#[test]
fn hello_with_another_version_is_refused() {
    let mut conn = open();
    write_message(&mut conn.stream, &Message::Hello(Hello { version: 99 })).unwrap();
    let mut s = conn.stream.try_clone().unwrap();
    let Message::Error(e) = read_message(&mut s).unwrap() else {
        panic!("expected an Error frame");
    };
    assert_eq!(e.code, ErrorCode::Version);
    assert!(
        e.message.contains("99") && e.message.contains('1'),
        "{}",
        e.message
    );
    assert!(matches!(read_message(&mut s), Err(FrameError::Closed)));
    assert!(conn.server.join().unwrap().is_err());
}

#[test]
fn a_request_before_hello_is_refused() {
    let mut conn = open();
    write_message(&mut conn.stream, &Message::Health(agent::Health {})).unwrap();
    expect_error_then_close(conn, ErrorCode::Protocol);
}

#[test]
fn exec_streams_stdout_stderr_and_exit_code() {
    let (mut c, _conn) = client();
    let r = c.exec(&sh("echo out; echo err >&2; exit 3")).unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&r.stderr), "err\n");
    assert_eq!((r.code, r.signal, r.timed_out), (Some(3), None, false));
    // The connection goes on: a second exec and a health check.
    let r = c.exec(&ExecRequest::new(["true"])).unwrap();
    assert_eq!(r.code, Some(0));
    c.health().unwrap();
}

#[test]
fn exec_with_stdin_env_and_cwd() {
    let (mut c, _conn) = client();
    let mut req = sh(r#"cat; echo "$FOO"; pwd; echo "$PATH"; echo "${TERM:-unset}""#);
    req.stdin = Some(b"from stdin\n".to_vec());
    req.env = vec![("FOO".into(), "bar baz".into())];
    req.cwd = Some("/tmp".into());
    let r = c.exec(&req).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "from stdin\nbar baz\n/tmp\n/bin:/sbin:/usr/bin:/usr/sbin\nunset\n"
    );
    assert_eq!(r.code, Some(0));

    // Without stdin the program reads /dev/null; env may override PATH.
    let mut req = sh(r#"cat; echo "[$PATH]""#);
    req.env = vec![("PATH".into(), "/usr/bin:/bin".into())];
    let r = c.exec(&req).unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "[/usr/bin:/bin]\n");
}

#[test]
fn stdin_larger_than_a_pipe_and_a_chunk() {
    let (mut c, _conn) = client();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut req = ExecRequest::new(["cat"]);
    req.stdin = Some(data.clone());
    let r = c.exec(&req).unwrap();
    assert_eq!(r.stdout.len(), data.len());
    assert!(r.stdout == data);
}

#[test]
fn large_output_arrives_whole_in_bounded_chunks() {
    let (c, conn) = client();
    drop(c);
    let mut s = conn.stream;
    let start = ExecStart {
        argv: vec![
            "head".into(),
            "-c".into(),
            "1000000".into(),
            "/dev/zero".into(),
        ],
        ..ExecStart::default()
    };
    write_message(&mut s, &Message::Exec(start)).unwrap();
    let mut total = 0;
    loop {
        match read_message(&mut s).unwrap() {
            Message::Stdout(d) => {
                assert!(!d.is_empty() && d.len() <= MAX_DATA_CHUNK);
                total += d.len();
            }
            Message::Exit(e) => {
                assert_eq!(e.code, Some(0));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(total, 1_000_000);
}

#[test]
fn timeout_kills_the_program() {
    let (mut c, _conn) = client();
    let mut req = ExecRequest::new(["sleep", "10"]);
    req.timeout_ms = Some(200);
    let t = Instant::now();
    let r = c.exec(&req).unwrap();
    assert!(r.timed_out);
    assert_eq!((r.code, r.signal), (None, Some(libc::SIGKILL)));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(t.elapsed() >= Duration::from_millis(200));
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let (mut c, _conn) = client();
    // The shell forks `sleep`, which holds the output pipe: killing only the shell would
    // leave the pipe open until the drain limit.
    let mut req = sh("sleep 10; echo never");
    req.timeout_ms = Some(200);
    let t = Instant::now();
    let r = c.exec(&req).unwrap();
    assert!(r.timed_out);
    assert!(r.stdout.is_empty());
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn a_background_process_holding_the_pipes_does_not_hold_the_answer() {
    let (mut c, _conn) = client();
    let t = Instant::now();
    let r = c.exec(&sh("sleep 3 & echo hi")).unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "hi\n");
    assert_eq!(r.code, Some(0));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn missing_program_is_an_exec_failed_error_and_the_connection_goes_on() {
    let (mut c, _conn) = client();
    let e = c
        .exec(&ExecRequest::new(["/no/such/program", "x"]))
        .unwrap_err();
    assert_eq!(remote_code(e), ErrorCode::ExecFailed);
    let e = c
        .exec(&ExecRequest::new(["no-such-program-in-path"]))
        .unwrap_err();
    let AgentError::Remote { message, .. } = e else {
        panic!("expected an agent error");
    };
    assert!(message.contains("no-such-program-in-path"), "{message}");
    let mut req = ExecRequest::new(["true"]);
    req.cwd = Some("/no/such/dir".into());
    assert_eq!(
        remote_code(c.exec(&req).unwrap_err()),
        ErrorCode::ExecFailed
    );
    c.health().unwrap();
}

#[test]
fn invalid_exec_is_a_bad_request_and_the_connection_goes_on() {
    let (c, conn) = client();
    let mut s = conn.stream.try_clone().unwrap();
    for start in [
        ExecStart::default(),
        ExecStart {
            argv: vec!["true".into()],
            env: vec![("A=B".into(), "c".into())],
            ..ExecStart::default()
        },
        ExecStart {
            argv: vec!["x".repeat(agent::MAX_EXEC_ARGS_BYTES)],
            ..ExecStart::default()
        },
    ] {
        write_message(&mut s, &Message::Exec(start)).unwrap();
        let Message::Error(e) = read_message(&mut s).unwrap() else {
            panic!("expected an Error frame");
        };
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.len() <= MAX_ERROR_MESSAGE);
    }
    let mut c = c;
    c.health().unwrap();
}

#[test]
fn unknown_reserved_and_oversized_frames_close_the_connection() {
    let cases: [(u8, u32, ErrorCode); 6] = [
        (0x99, 0, ErrorCode::Protocol),
        (0x00, 0, ErrorCode::Protocol),
        (0x46, 0, ErrorCode::Unsupported),
        (0x62, 0, ErrorCode::Unsupported),
        // A defined type with an empty (so not JSON) payload.
        (FrameType::Manifest.as_u8(), 0, ErrorCode::Protocol),
        (
            FrameType::Exec.as_u8(),
            u32::try_from(MAX_CONTROL_PAYLOAD + 1).unwrap(),
            ErrorCode::TooLarge,
        ),
    ];
    for (kind, len, code) in cases {
        let (c, mut conn) = client();
        drop(c);
        let mut header = encode_header(FrameType::Health, 0).unwrap();
        header[3] = kind;
        header[4..8].copy_from_slice(&len.to_le_bytes());
        conn.stream.write_all(&header).unwrap();
        expect_error_then_close(conn, code);
    }
    // Bad JSON in a known frame.
    let (c, mut conn) = client();
    drop(c);
    write_frame(&mut conn.stream, FrameType::Exec, b"{\"argv\": 7}").unwrap();
    expect_error_then_close(conn, ErrorCode::Protocol);
    // A frame the host never sends.
    let (c, mut conn) = client();
    drop(c);
    write_message(&mut conn.stream, &Message::Stdout(b"x".to_vec())).unwrap();
    expect_error_then_close(conn, ErrorCode::Protocol);
}

#[test]
fn truncated_frame_ends_the_connection_quietly() {
    let (c, mut conn) = client();
    drop(c);
    let mut bytes = encode_header(FrameType::Exec, 100).unwrap().to_vec();
    bytes.extend_from_slice(b"{\"argv\"");
    conn.stream.write_all(&bytes).unwrap();
    conn.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(
        conn.server.join().unwrap(),
        Err(ServeError::Frame(FrameError::Truncated))
    ));
}

#[test]
fn stdin_over_the_limit_is_too_large() {
    let (c, mut conn) = client();
    drop(c);
    let start = ExecStart {
        argv: vec!["cat".into()],
        stdin: true,
        ..ExecStart::default()
    };
    write_message(&mut conn.stream, &Message::Exec(start)).unwrap();
    let chunk = vec![0u8; MAX_DATA_CHUNK];
    for _ in 0..=agent::MAX_EXEC_STDIN / MAX_DATA_CHUNK {
        if write_message(&mut conn.stream, &Message::Stdin(chunk.clone())).is_err() {
            break; // the agent refused and closed while we were still sending
        }
    }
    expect_error_then_close(conn, ErrorCode::TooLarge);
}

#[test]
fn host_going_away_mid_exec_kills_the_program() {
    let (c, conn) = client();
    drop(c);
    let pidfile = std::env::temp_dir().join(format!("gi-agent-kill-{}", std::process::id()));
    let mut req = sh(r#"echo $$ > "$0"; while :; do echo tick; sleep 0.05; done"#);
    req.argv.push(pidfile.display().to_string());
    let mut s = conn.stream;
    write_message(&mut s, &Message::Exec(req.start())).unwrap();
    // Read the first chunk, then hang up.
    assert!(matches!(read_message(&mut s).unwrap(), Message::Stdout(_)));
    drop(s);
    assert!(conn.server.join().unwrap().is_err());
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let _ = std::fs::remove_file(&pidfile);
    let stat = format!("/proc/{}/stat", pid.trim());
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&stat).exists() {
        assert!(Instant::now() < deadline, "exec {pid} still running");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn shutdown_is_acknowledged_then_reported_when_the_host_closes() {
    let (c, conn) = client();
    c.shutdown().unwrap();
    let t = Duration::from_secs(10);
    assert_eq!(
        conn.stages.recv_timeout(t).unwrap(),
        ShutdownStage::Requested
    );
    // The test still holds a clone of the stream: the agent waits for it.
    assert!(conn
        .stages
        .recv_timeout(Duration::from_millis(100))
        .is_err());
    drop(conn.stream);
    assert_eq!(conn.stages.recv_timeout(t).unwrap(), ShutdownStage::Closed);
    assert!(conn.server.join().unwrap().is_ok());
}

#[test]
fn accept_loop_serves_connections_in_parallel_and_caps_them() {
    let dir = std::env::temp_dir().join(format!("gi-agent-listen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (ctx, _stages) = context();
    spawn_accept_loop(listener, Arc::new(ctx)).unwrap();

    // Parallel execs: each sleeps, so serial service would take far longer.
    let t = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|i| {
            let path = path.clone();
            thread::spawn(move || {
                let mut c = AgentClient::new(UnixStream::connect(path).unwrap());
                c.hello().unwrap();
                let r = c.exec(&sh(&format!("sleep 0.5; echo {i}"))).unwrap();
                assert_eq!(String::from_utf8_lossy(&r.stdout), format!("{i}\n"));
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert!(
        t.elapsed() < Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );

    // Fill every slot, then one more is told busy.
    let held: Vec<_> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let mut c = AgentClient::new(UnixStream::connect(&path).unwrap());
            c.hello().unwrap();
            c
        })
        .collect();
    // The agent says busy without waiting for a request.
    let mut extra = UnixStream::connect(&path).unwrap();
    let Message::Error(e) = read_message(&mut extra).unwrap() else {
        panic!("expected an Error frame");
    };
    assert_eq!(e.code, ErrorCode::Busy);
    // Freeing a slot lets the next one in.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = AgentClient::new(UnixStream::connect(&path).unwrap());
        if c.hello().is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "slots never freed");
        thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn wait_for_exit(c: &mut AgentClient<UnixStream>) -> agent::WorkloadStatusOk {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.workload_status().unwrap();
        if s.state == WorkloadState::Exited {
            return s;
        }
        assert_eq!(s.state, WorkloadState::Running);
        assert!(Instant::now() < deadline, "workload never exited");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Reads the whole log from 0, polling until it ends with `tail`.
fn logs_until(c: &mut AgentClient<UnixStream>, tail: &[u8]) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut all = Vec::new();
        let mut offset = 0;
        loop {
            let chunk = c.logs(offset, 7).unwrap();
            assert!(!chunk.dropped);
            assert_eq!(chunk.start, offset);
            if chunk.data.is_empty() {
                break;
            }
            assert!(chunk.data.len() <= 7);
            offset = chunk.end;
            all.extend_from_slice(&chunk.data);
        }
        if all.ends_with(tail) {
            return all;
        }
        assert!(Instant::now() < deadline, "log so far: {all:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn manifest_starts_a_workload_that_any_connection_can_follow() {
    let dir = scratch_dir("srv-manifest");
    let (ctx, _stages) = context_with(test_config(&dir, LOG_RING_SIZE));
    let ctx = Arc::new(ctx);
    let mut c = client_on(&ctx);
    assert_eq!(c.workload_status().unwrap().state, WorkloadState::None);
    let empty = c.logs(0, 100).unwrap();
    assert_eq!((empty.start, empty.end, empty.data.len()), (0, 0, 0));

    // A large delivery: 128 KiB of env, and a manifest that repeats it.
    let stop = dir.join("stop");
    let mut d = delivery(&[
        "/bin/sh",
        "-c",
        r#"printf '%s' "$BIG_127" | wc -c; echo started
           while [ ! -e "$STOP" ]; do sleep 0.02; done
           echo done >&2; exit 7"#,
    ]);
    d.workload.env = (0..128)
        .map(|i| (format!("BIG_{i}"), "x".repeat(1000)))
        .collect();
    d.workload
        .env
        .push(("STOP".into(), stop.display().to_string()));
    let env_json: Vec<String> = d
        .workload
        .env
        .iter()
        .map(|(k, v)| format!("{k:?}: {v:?}"))
        .collect();
    let text = format!(r#"{{"schema": 1, "env": {{{}}}}}"#, env_json.join(", "));
    d.manifest = RawManifest::from_json(text).unwrap();
    assert!(d.manifest.get().len() > 128 * 1000);
    let pid = c.send_manifest(&d).unwrap();
    let s = c.workload_status().unwrap();
    assert_eq!((s.state, s.pid), (WorkloadState::Running, Some(pid)));

    // A second manifest while it runs is refused; the connection goes on.
    let e = c.send_manifest(&delivery(&["true"])).unwrap_err();
    let AgentError::Remote { code, message } = e else {
        panic!("expected an agent error");
    };
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("already running"), "{message}");
    c.health().unwrap();

    // Another connection follows the log while the workload runs, then after it exits.
    let mut other = client_on(&ctx);
    let log = logs_until(&mut other, b"started\n");
    assert_eq!(
        String::from_utf8_lossy(&log).trim_start(),
        "1000\nstarted\n"
    );
    std::fs::write(&stop, b"").unwrap();
    let s = wait_for_exit(&mut other);
    assert_eq!((s.pid, s.code, s.signal), (Some(pid), Some(7), None));
    let log = logs_until(&mut c, b"done\n");
    assert!(log.ends_with(b"started\ndone\n"));
    // Past the end: nothing, from the end.
    let end = u64::try_from(log.len()).unwrap();
    let past = c.logs(end + 100, 10).unwrap();
    assert_eq!((past.start, past.end, past.dropped), (end, end, false));

    // The stored manifest is the one sent, verbatim.
    let stored = std::fs::read_to_string(dir.join("run").join(MANIFEST_FILE)).unwrap();
    assert_eq!(stored, d.manifest.get());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_manifests_are_refused_and_the_connection_goes_on() {
    let dir = scratch_dir("srv-badmanifest");
    let (ctx, _stages) = context_with(test_config(&dir, LOG_RING_SIZE));
    let ctx = Arc::new(ctx);
    let mut c = client_on(&ctx);
    // The client refuses these itself, so write the frames by hand.
    let payloads = [
        // Exec's rules: an env name with '='.
        r#"{"vm_id":"v","hostname":"h","workload":{"argv":["true"],"env":[["A=B","c"]]},"manifest":{}}"#,
        // Not an object.
        r#"{"vm_id":"v","hostname":"h","workload":{"argv":["true"]},"manifest":[1]}"#,
        // A bad hostname.
        r#"{"vm_id":"v","hostname":"a/b","workload":{"argv":["true"]},"manifest":{}}"#,
    ];
    for p in payloads {
        let s = c.get_mut();
        write_frame(s, FrameType::Manifest, p.as_bytes()).unwrap();
        let Message::Error(e) = read_message(s).unwrap() else {
            panic!("expected an Error frame");
        };
        assert_eq!(e.code, ErrorCode::BadRequest, "{}", e.message);
    }
    let e = c
        .send_manifest(&delivery(&["/no/such/program"]))
        .unwrap_err();
    assert_eq!(remote_code(e), ErrorCode::ExecFailed);
    c.health().unwrap();
    assert_eq!(c.workload_status().unwrap().state, WorkloadState::None);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn logs_are_capped_bounded_in_chunks_and_report_drops() {
    let dir = scratch_dir("srv-biglog");
    let mut config = test_config(&dir, LOG_RING_SIZE);
    config.console = None;
    let (ctx, _stages) = context_with(config);
    let ctx = Arc::new(ctx);
    let mut c = client_on(&ctx);
    // 3 MB of output into a 1 MiB ring.
    c.send_manifest(&delivery(&[
        "/bin/sh",
        "-c",
        "head -c 3000000 /dev/zero | tr '\\0' 'z'; echo end",
    ]))
    .unwrap();
    wait_for_exit(&mut c);
    let total = 3_000_004u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    let chunk = loop {
        let chunk = c.logs(0, u32::MAX).unwrap();
        if chunk.data.ends_with(b"zend\n") {
            break chunk;
        }
        assert!(Instant::now() < deadline, "log never complete");
        thread::sleep(Duration::from_millis(20));
    };
    // max_bytes is capped at 1 MiB, and the ring holds the newest 1 MiB: all of it.
    let ring = u64::try_from(LOG_RING_SIZE).unwrap();
    assert!(chunk.dropped);
    assert_eq!((chunk.start, chunk.end), (total - ring, total));
    assert_eq!(chunk.data.len(), agent::MAX_LOG_READ);
    // From the middle of what is held, with a small cap.
    let mid = c.logs(total - 10, 4).unwrap();
    assert_eq!(
        (mid.start, mid.end, mid.dropped),
        (total - 10, total - 6, false)
    );
    assert_eq!(mid.data, b"zzzz");

    // On the wire: LogsOk, then data frames of at most MAX_DATA_CHUNK, nothing more.
    let s = c.get_mut();
    write_message(
        s,
        &Message::Logs(agent::LogsRequest {
            offset: total - ring,
            max_bytes: 200_000,
        }),
    )
    .unwrap();
    let Message::LogsOk(ok) = read_message(s).unwrap() else {
        panic!("expected LogsOk");
    };
    assert_eq!((ok.end - ok.start, ok.dropped), (200_000, false));
    let mut got = 0;
    while got < 200_000 {
        let Message::Stdout(d) = read_message(s).unwrap() else {
            panic!("expected log data");
        };
        assert!(!d.is_empty() && d.len() <= MAX_DATA_CHUNK);
        got += d.len();
    }
    assert_eq!(got, 200_000);
    c.health().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resync_over_the_connection_with_a_fake_machine() {
    let (ctx, _stages) = context();
    let ctx = Arc::new(ctx);
    let mut c = client_on(&ctx);
    // The fake guest's clock is at 1_600_000_000 s; the host is at 1_600_000_100.5 s.
    let req = agent::ResyncRequest::new(1_600_000_100_500_000_000, &[9; 48], Some("c-1".into()));
    let reply = c.resync(&req).unwrap();
    assert_eq!(reply.clock_step_ms, 100_500);
    assert!(reply.entropy_credited);
    assert_eq!(reply.hostname, "c-1");
    // Bad values are refused with bad_request and the connection goes on; the client
    // refuses them itself, so write the frames by hand.
    let payloads = [
        format!(r#"{{"unix_time_ns":1,"seed":"{}"}}"#, "00".repeat(31)),
        format!(r#"{{"unix_time_ns":1,"seed":"{}"}}"#, "00".repeat(257)),
        format!(r#"{{"unix_time_ns":1,"seed":"{}0"}}"#, "00".repeat(32)),
        format!(r#"{{"unix_time_ns":1,"seed":"{}xy"}}"#, "00".repeat(32)),
        format!(
            r#"{{"unix_time_ns":1,"seed":"{}","hostname":"a_b"}}"#,
            "00".repeat(32)
        ),
    ];
    for p in &payloads {
        let s = c.get_mut();
        write_frame(s, FrameType::Resync, p.as_bytes()).unwrap();
        let Message::Error(e) = read_message(s).unwrap() else {
            panic!("expected an Error frame");
        };
        assert_eq!(e.code, ErrorCode::BadRequest, "{}", e.message);
    }
    // None of them changed anything: the hostname is still the one set above.
    let reply = c
        .resync(&agent::ResyncRequest::new(
            1_600_000_100_500_000_000,
            &[1; 32],
            None,
        ))
        .unwrap();
    assert_eq!((reply.clock_step_ms, reply.hostname.as_str()), (0, "c-1"));
    c.health().unwrap();
    // A payload that is not a resync request at all is a protocol error: the agent closes.
    let s = c.get_mut();
    write_frame(s, FrameType::Resync, br#"{"seed":"00"}"#).unwrap();
    let Message::Error(e) = read_message(s).unwrap() else {
        panic!("expected an Error frame");
    };
    assert_eq!(e.code, ErrorCode::Protocol);
    assert!(matches!(read_message(s), Err(FrameError::Closed)));
}
