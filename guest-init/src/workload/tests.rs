//! The workload with real child processes (through the test binary's shared reaper), a
//! temporary run directory, and a plain file standing in for the console.

use super::*;
use crate::reaper::test_reaper;
use agent::{ExecStart, RawManifest, WorkloadSpec};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

/// A fresh directory for one test; the caller removes it.
pub(crate) fn scratch_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("gi-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A configuration that leaves the host alone: no hostname, manifest under `dir/run`, the
/// console copy in `dir/console` (created here, as the real console exists).
pub(crate) fn test_config(dir: &Path, log_capacity: usize) -> WorkloadConfig {
    std::fs::create_dir_all(dir).unwrap();
    let console = dir.join("console");
    File::create(&console).unwrap();
    WorkloadConfig {
        run_dir: dir.join("run"),
        set_hostname: false,
        console: Some(console),
        log_capacity,
    }
}

pub(crate) fn delivery(argv: &[&str]) -> ManifestDelivery {
    ManifestDelivery {
        vm_id: "vm-test".into(),
        hostname: "test-host".into(),
        workload: WorkloadSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..WorkloadSpec::default()
        },
        manifest: RawManifest::from_json(r#"{"name": "t",  "keep": "spacing"}"#.into()).unwrap(),
    }
}

fn sh(script: &str) -> ManifestDelivery {
    delivery(&["/bin/sh", "-c", script])
}

fn wait_exited(w: &Workload) -> WorkloadStatusOk {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = w.status();
        if s.state == WorkloadState::Exited {
            return s;
        }
        assert!(Instant::now() < deadline, "workload still {:?}", s.state);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the log holds `want` bytes (the pump may lag the exit a little).
fn wait_log(w: &Workload, want: u64) -> LogRead {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if lock(&w.log).written() >= want {
            return w.read_log(0, usize::MAX);
        }
        assert!(
            Instant::now() < deadline,
            "log stuck at {}",
            lock(&w.log).written()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn validation_reuses_the_exec_rules_and_changes_nothing() {
    let dir = scratch_dir("wl-valid");
    let w = Workload::new(test_config(&dir, 1024), test_reaper());
    let mut bad_env = delivery(&["true"]);
    bad_env.workload.env = vec![("A=B".into(), "c".into())];
    let mut too_big = delivery(&["true"]);
    too_big
        .workload
        .argv
        .push("x".repeat(agent::MAX_EXEC_ARGS_BYTES));
    for d in [delivery(&[]), delivery(&[""]), bad_env, too_big] {
        let as_exec = ExecStart {
            argv: d.workload.argv.clone(),
            env: d.workload.env.clone(),
            cwd: d.workload.cwd.clone(),
            ..ExecStart::default()
        };
        let err = w.start(&d).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert_eq!(
            err.message,
            format!("workload: {}", as_exec.validate().unwrap_err())
        );
    }
    let mut bad_host = delivery(&["true"]);
    bad_host.hostname = "a b".into();
    assert_eq!(w.start(&bad_host).unwrap_err().code, ErrorCode::BadRequest);
    // Refused before any side effect.
    assert!(!dir.join("run").exists());
    assert_eq!(w.status(), WorkloadStatusOk::default());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn runs_logs_copies_to_the_console_and_records_the_exit() {
    let dir = scratch_dir("wl-run");
    let w = Workload::new(test_config(&dir, 1024), test_reaper());
    let mut d = sh(r#"echo "out $FOO"; echo err >&2; pwd; cat; exit 3"#);
    d.workload.env = vec![("FOO".into(), "bar".into())];
    d.workload.cwd = Some("/tmp".into());
    let pid = w.start(&d).unwrap();
    assert!(pid > 0);
    let s = wait_exited(&w);
    assert_eq!((s.pid, s.code, s.signal), (Some(pid), Some(3), None));

    // stdin was /dev/null (cat ended at once); both streams went into one log.
    let expect = "out bar\nerr\n/tmp\n";
    let log = wait_log(&w, expect.len() as u64);
    assert_eq!((log.start, log.dropped), (0, false));
    assert_eq!(String::from_utf8_lossy(&log.data), expect);

    // The manifest, byte for byte, mode 0600.
    let path = dir.join("run").join(MANIFEST_FILE);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), d.manifest.get());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // The console copy arrives shortly after.
    let console = dir.join("console");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&console).unwrap() != expect {
        assert!(Instant::now() < deadline, "console copy incomplete");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn one_running_workload_at_a_time_then_a_new_one_appends_to_the_log() {
    let dir = scratch_dir("wl-twice");
    let w = Workload::new(test_config(&dir, 1024), test_reaper());
    let first = w.start(&sh("echo one; sleep 0.5")).unwrap();
    assert_eq!(w.status().state, WorkloadState::Running);
    let err = w.start(&sh("echo two")).unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest);
    assert!(err.message.contains("already running"), "{}", err.message);
    wait_exited(&w);
    wait_log(&w, 4);
    let second = w.start(&sh("echo two; kill -9 $$")).unwrap();
    assert_ne!(first, second);
    let s = wait_exited(&w);
    assert_eq!((s.pid, s.code, s.signal), (Some(second), None, Some(9)));
    let log = wait_log(&w, 8);
    assert_eq!(log.data, b"one\ntwo\n");
    let r = w.read_log(4, 100);
    assert_eq!((r.start, r.data.as_slice()), (4, &b"two\n"[..]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_program_that_cannot_start_is_exec_failed() {
    let dir = scratch_dir("wl-fail");
    let w = Workload::new(test_config(&dir, 1024), test_reaper());
    let err = w.start(&delivery(&["/no/such/program"])).unwrap_err();
    assert_eq!(err.code, ErrorCode::ExecFailed);
    assert!(err.message.contains("/no/such/program"), "{}", err.message);
    let mut d = delivery(&["true"]);
    d.workload.cwd = Some("/no/such/dir".into());
    assert_eq!(w.start(&d).unwrap_err().code, ErrorCode::ExecFailed);
    assert_eq!(w.status().state, WorkloadState::None);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unwritable_run_dir_is_internal() {
    let dir = scratch_dir("wl-rundir");
    let mut config = test_config(&dir, 1024);
    // A file where the directory should be.
    std::fs::write(dir.join("blocker"), b"").unwrap();
    config.run_dir = dir.join("blocker").join("run");
    let w = Workload::new(config, test_reaper());
    let err = w.start(&delivery(&["true"])).unwrap_err();
    assert_eq!(err.code, ErrorCode::Internal);
    assert_eq!(w.status().state, WorkloadState::None);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn output_beyond_the_ring_is_dropped_from_the_front() {
    let dir = scratch_dir("wl-ring");
    let mut config = test_config(&dir, 4096);
    config.console = None;
    let w = Workload::new(config, test_reaper());
    // 10000 bytes of digits into a 4096-byte log.
    w.start(&sh(
        "i=0; while [ $i -lt 1000 ]; do printf '%09d\\n' $i; i=$((i+1)); done",
    ))
    .unwrap();
    wait_exited(&w);
    let log = wait_log(&w, 10_000);
    assert_eq!(
        (log.start, log.data.len(), log.dropped),
        (10_000 - 4096, 4096, true)
    );
    assert!(log.data.ends_with(b"000000999\n"));
    let _ = std::fs::remove_dir_all(&dir);
}
