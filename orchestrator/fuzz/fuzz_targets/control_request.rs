//! Fuzzes the control API as a client reaches it: a method, a path with its query, an
//! `Accept` header and a body of any shape go through the daemon's own router
//! (`orchestrator::daemon::api::router`), the same one the control socket serves.
//!
//! The daemon is real but holds no manifests, so no request can start a VM, touch the
//! network or spawn the jailer. The one request that could add a manifest (`POST` to a path
//! naming manifests) is skipped: `manifest_parse` fuzzes that parser.
//!
//! Input layout:
//!   [0]   method selector: `sel % 8` below 7 picks a method from `METHODS`; 7 reads the
//!         method as a field instead.
//!   [1]   flags: bit 0 sends `Accept: application/x-ndjson`, bit 1 `Accept:
//!         text/event-stream`.
//!   then  the method field when selected, then the path field. A field is one length byte
//!         `n` and the next `n` bytes (fewer if the input ends).
//!   rest  the body.
//!
//! Checks: no panic, and an answer (libFuzzer's `-timeout` catches a hang); never a 5xx
//! (with nothing in the database every refusal is the client's fault); every 4xx is the
//! documented `{"error": {"kind", "message", "fields": [{"path", "reason"}]}}` with a kind
//! that matches its status and a non-empty message; afterwards the daemon still lists no
//! manifests and no VMs, and keeps no per-id state for the ids it was asked about.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use libfuzzer_sys::fuzz_target;
use orchestrator::daemon::{api, Config, Daemon};
use orchestrator::store::Store;
use serde_json::Value;
use tower::ServiceExt;

const METHODS: [&str; 7] = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "get"];

/// Bodies read back are capped; the largest answer from an empty daemon is far smaller.
const MAX_ANSWER: usize = 1 << 20;

struct Fixture {
    rt: tokio::runtime::Runtime,
    daemon: Arc<Daemon>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("orch-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("state")).expect("create the fuzz state directory");
        let config = Config {
            state_dir: dir.join("state"),
            socket: dir.join("o.sock"),
            socket_gid: None,
            tcp: None,
            token: None,
            subnet: "10.77.0.0/29".parse().expect("subnet"),
            bridge: "unused0".into(),
            jailer: PathBuf::from("/nonexistent/jailer"),
            vmm: PathBuf::from("/nonexistent/vmm"),
            uid_base: 20000,
            ready_timeout: Duration::from_secs(1),
        };
        let store = Store::open(&config.db_path()).expect("open the fuzz database");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        Fixture {
            rt,
            daemon: Arc::new(Daemon::new(config, store)),
        }
    })
}

/// Splits off one length-prefixed field.
fn field(data: &[u8]) -> (Vec<u8>, &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let (s, rest) = rest.split_at(rest.len().min(usize::from(n)));
    (s.to_vec(), rest)
}

/// The status an error kind must come with.
fn status_of(kind: &str) -> Option<u16> {
    Some(match kind {
        "bad_request" => 400,
        "unauthorized" => 401,
        "not_found" => 404,
        "method_not_allowed" => 405,
        "conflict" => 409,
        "payload_too_large" => 413,
        "unavailable" => 503,
        "timeout" => 504,
        "internal" => 500,
        _ => return None,
    })
}

fn check_error(status: StatusCode, body: &[u8], what: &str) {
    let v: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "{what}: {status} with a body that is not JSON ({e}): {:?}",
            String::from_utf8_lossy(body)
        )
    });
    let err = v
        .get("error")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("{what}: {status}: no \"error\" object: {v}"));
    let kind = err.get("kind").and_then(Value::as_str).unwrap_or_default();
    assert_eq!(
        status_of(kind),
        Some(status.as_u16()),
        "{what}: kind {kind:?} under status {status}: {v}"
    );
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert!(!message.is_empty(), "{what}: empty message: {v}");
    let fields = err
        .get("fields")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{what}: no \"fields\" array: {v}"));
    for f in fields {
        assert!(
            f.get("path").is_some_and(Value::is_string)
                && f.get("reason").is_some_and(Value::is_string),
            "{what}: a field error without path and reason: {v}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let [sel, flags, rest @ ..] = data else {
        return;
    };
    let (method, rest) = match METHODS.get(usize::from(sel % 8)) {
        Some(m) => (m.as_bytes().to_vec(), rest),
        None => field(rest),
    };
    let (path, body) = field(rest);
    let Ok(method) = Method::from_bytes(&method) else {
        return; // not a token: the HTTP layer refuses it before the router
    };
    let path_text = String::from_utf8_lossy(&path);
    if method == Method::POST && path_text.contains("manifests") {
        return;
    }
    let mut req = Request::builder().method(method.clone()).uri(&path[..]);
    if flags & 1 != 0 {
        req = req.header(header::ACCEPT, "application/x-ndjson");
    }
    if flags & 2 != 0 {
        req = req.header(header::ACCEPT, "text/event-stream");
    }
    let Ok(req) = req.body(Body::from(body.to_vec())) else {
        return; // not a URI: the HTTP layer refuses it before the router
    };
    let what = format!("{method} {path_text:?}");

    let f = fixture();
    f.rt.block_on(async {
        let resp = api::router(Arc::clone(&f.daemon))
            .oneshot(req)
            .await
            .expect("the router is infallible");
        let status = resp.status();
        assert!(!status.is_server_error(), "{what}: {status}");
        let streaming = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if streaming {
            // An event stream never ends by itself; its head is the answer.
            assert_eq!(status, StatusCode::OK, "{what}");
            return;
        }
        let body = axum::body::to_bytes(resp.into_body(), MAX_ANSWER)
            .await
            .unwrap_or_else(|e| panic!("{what}: reading the answer: {e}"));
        if status.is_client_error() && method != Method::HEAD {
            check_error(status, &body, &what);
        }
    });

    let d = &f.daemon;
    let manifests = d
        .with_store(|s| s.list_manifests())
        .expect("list manifests");
    assert!(manifests.is_empty(), "{what} added a manifest");
    let vms = d.with_store(|s| s.list_vms()).expect("list VMs");
    assert!(vms.is_empty(), "{what} added a VM");
    // Per-id state does not pile up: each map keeps at most the last request's id (dropped
    // at the next use), and no VM has activity.
    assert!(
        d.vm_locks.len() <= 1,
        "{what}: {} VM locks kept",
        d.vm_locks.len()
    );
    assert!(
        d.agent_slots.len() <= 1,
        "{what}: {} agent slot sets kept",
        d.agent_slots.len()
    );
    let activity = d.activity.lock().unwrap_or_else(|p| p.into_inner()).len();
    assert_eq!(
        activity, 0,
        "{what}: activity recorded for a VM that does not exist"
    );
});
