//! The API server against its OpenAPI document, with a mock VMM and no KVM.
//!
//! Every operation in `vmm/api/openapi.yaml` is sent with each of its examples over the
//! unix socket; the test checks that the example fits its own schema, that the mock VMM
//! received the action named by `x-vmm-action`, that the status is one the document lists,
//! and that the answer fits the documented schema. Conversely, paths and methods the
//! document does not list must answer 404 and 405. The client is a raw HTTP/1.1 write: a
//! test client, not a parser.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};
use vmm::api::{
    ApiError, ApiRequest, ApiServer, ApiServerConfig, ApiServerError, InstanceInfo, VmmAction,
    VmmData,
};
use vmm::config::{BootSource, DriveConfig, MachineConfig, VmConfig};
use vmm_sys_util::eventfd::EventFd;

/// Every `VmmAction` variant: the document must reach each one. (`VmmAction::kind` is an
/// exhaustive match, so a new variant is noticed there; add it here too.)
const ALL_ACTIONS: [&str; 16] = [
    "GetInstanceInfo",
    "PutBootSource",
    "PutMachineConfig",
    "GetMachineConfig",
    "PutDrive",
    "PutNetworkInterface",
    "PutVsock",
    "PutEntropy",
    "InstanceStart",
    "SendCtrlAltDel",
    "Pause",
    "Resume",
    "CreateSnapshot",
    "LoadSnapshot",
    "GetMetrics",
    "GetVmConfig",
];

const METHODS: [&str; 5] = ["GET", "PUT", "PATCH", "POST", "DELETE"];

// ---- the mock VMM -------------------------------------------------------------------

/// How the mock answers.
const OK: u8 = 0;
const CONFLICT: u8 = 1;
/// Keeps the request unanswered (the API times out).
const HANG: u8 = 2;
/// Drops the request without answering.
const DROP: u8 = 3;

/// A canned answer for each action, shaped as the real VMM's.
fn canned(action: &VmmAction) -> VmmData {
    match action {
        VmmAction::GetInstanceInfo => VmmData::InstanceInfo(InstanceInfo {
            id: "mock-vm".into(),
            state: InstanceInfo::NOT_STARTED.into(),
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            app_name: "vmm".into(),
        }),
        VmmAction::GetMachineConfig => VmmData::MachineConfig(MachineConfig::default()),
        VmmAction::GetMetrics => VmmData::Json(json!({"api": {"requests": 3}, "block": {}})),
        VmmAction::GetVmConfig => VmmData::VmConfig(VmConfig {
            boot_source: BootSource {
                kernel_image_path: "/srv/vmlinux".into(),
                ..Default::default()
            },
            drives: vec![DriveConfig {
                drive_id: "rootfs".into(),
                path_on_host: "/srv/rootfs.ext4".into(),
                is_root_device: true,
                is_read_only: false,
            }],
            ..Default::default()
        }),
        _ => VmmData::Empty,
    }
}

/// Serves requests like the event loop: wait for the eventfd, then drain the channel. A
/// server that forgot to write the eventfd would leave every request unanswered.
fn mock_vmm(rx: Receiver<ApiRequest>, wake: EventFd, mode: Arc<AtomicU8>, seen: Sender<VmmAction>) {
    let mut hung = Vec::new();
    while wake.read().is_ok() {
        loop {
            let request = match rx.try_recv() {
                Ok(r) => r,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            };
            let _ = seen.send(request.action.clone());
            match mode.load(Ordering::SeqCst) {
                OK => {
                    let data = canned(&request.action);
                    request.respond(Ok(data));
                }
                CONFLICT => {
                    let kind = request.action.kind();
                    request.respond(Err(ApiError::conflict(format!(
                        "{kind} is not possible in state Running"
                    ))));
                }
                HANG => hung.push(request),
                _ => drop(request),
            }
        }
    }
}

struct Harness {
    server: Option<ApiServer>,
    sock: PathBuf,
    mode: Arc<AtomicU8>,
    seen: Receiver<VmmAction>,
    wake: EventFd,
    vmm: Option<JoinHandle<()>>,
}

fn test_config() -> ApiServerConfig {
    ApiServerConfig {
        header_timeout: Duration::from_secs(2),
        body_timeout: Duration::from_secs(2),
        reply_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

/// A fresh directory for one test's socket.
fn temp_sock(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vmm-api-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

impl Harness {
    fn new(config: ApiServerConfig) -> Harness {
        let sock = temp_sock("api.sock");
        let (tx, rx) = channel();
        let (seen_tx, seen) = channel();
        let wake = EventFd::new(0).unwrap();
        let mode = Arc::new(AtomicU8::new(OK));
        let vmm = {
            let (wake, mode) = (wake.try_clone().unwrap(), Arc::clone(&mode));
            std::thread::spawn(move || mock_vmm(rx, wake, mode, seen_tx))
        };
        let server = ApiServer::start_with_config(&sock, tx, wake.try_clone().unwrap(), config)
            .expect("start the API server");
        assert_eq!(server.path(), sock);
        Harness {
            server: Some(server),
            sock,
            mode,
            seen,
            wake,
            vmm: Some(vmm),
        }
    }

    fn set_mode(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    /// The action the mock received for the last request.
    fn received(&self) -> VmmAction {
        self.seen
            .recv_timeout(Duration::from_secs(5))
            .expect("the mock VMM received no action")
    }

    fn assert_nothing_received(&self) {
        if let Ok(a) = self.seen.try_recv() {
            panic!("the mock VMM received {a:?}");
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Dropping the server drops the channel's sender; the wake lets the mock see it.
        drop(self.server.take());
        let _ = self.wake.write(1);
        if let Some(vmm) = self.vmm.take() {
            vmm.join().unwrap();
        }
        if !std::thread::panicking() {
            assert!(!self.sock.exists(), "the socket outlived the server");
        }
    }
}

// ---- a raw HTTP/1.1 client ------------------------------------------------------------

#[derive(Debug)]
struct Reply {
    status: u16,
    /// Lower-cased header lines.
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Json {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {self:?}"))
    }

    /// Asserts an error answer: `status`, a JSON `fault_message` containing each needle.
    fn fault(&self, status: u16, needles: &[&str]) {
        assert_eq!(self.status, status, "{self:?}");
        assert!(
            self.headers.contains("content-type: application/json"),
            "{self:?}"
        );
        let msg = self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message: {self:?}"))
            .to_string();
        for n in needles {
            assert!(msg.contains(n), "{n:?} not in {msg:?}");
        }
    }
}

fn send_raw(sock: &Path, raw: &[u8]) -> Reply {
    let mut s = UnixStream::connect(sock).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The server may answer (413) and close before reading all of a large body.
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read the answer");
    let text = String::from_utf8(out).expect("UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete answer");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    let headers = head.to_ascii_lowercase();
    assert!(!headers.contains("transfer-encoding"), "{head}");
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

fn http(sock: &Path, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(b) = body {
        raw += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        );
    }
    raw += "\r\n";
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(body.unwrap_or_default());
    send_raw(sock, &raw)
}

// ---- the document ---------------------------------------------------------------------

fn spec() -> Json {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/api/openapi.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::from_str(&text).expect("openapi.yaml parses")
}

/// Follows a local `$ref`.
fn resolve<'a>(doc: &'a Json, v: &'a Json) -> &'a Json {
    match v.get("$ref").and_then(Json::as_str) {
        Some(r) => {
            let ptr = r.strip_prefix('#').expect("only local $refs");
            resolve(
                doc,
                doc.pointer(ptr).unwrap_or_else(|| panic!("dangling {r}")),
            )
        }
        None => v,
    }
}

/// The subset of JSON Schema the document uses.
fn validate(doc: &Json, schema: &Json, v: &Json, at: &str) -> Result<(), String> {
    let s = resolve(doc, schema);
    let fail = |what: String| Err(format!("{at}: {what} (value {v})"));
    if let Some(t) = s.get("type").and_then(Json::as_str) {
        let fits = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            other => return fail(format!("unknown schema type {other}")),
        };
        if !fits {
            return fail(format!("not a {t}"));
        }
    }
    if let Some(allowed) = s.get("enum").and_then(Json::as_array) {
        if !allowed.contains(v) {
            return fail(format!("not one of {allowed:?}"));
        }
    }
    if let Some(text) = v.as_str() {
        let len = text.chars().count() as u64;
        if s.get("minLength")
            .and_then(Json::as_u64)
            .is_some_and(|m| len < m)
        {
            return fail("too short".into());
        }
        if s.get("maxLength")
            .and_then(Json::as_u64)
            .is_some_and(|m| len > m)
        {
            return fail("too long".into());
        }
    }
    if let Some(n) = v.as_f64() {
        if s.get("minimum")
            .and_then(Json::as_f64)
            .is_some_and(|m| n < m)
        {
            return fail("below minimum".into());
        }
        if s.get("maximum")
            .and_then(Json::as_f64)
            .is_some_and(|m| n > m)
        {
            return fail("above maximum".into());
        }
    }
    if let (Some(items), Some(values)) = (s.get("items"), v.as_array()) {
        for (i, item) in values.iter().enumerate() {
            validate(doc, items, item, &format!("{at}[{i}]"))?;
        }
    }
    if let Some(obj) = v.as_object() {
        let props = s.get("properties").and_then(Json::as_object);
        for req in s
            .get("required")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
        {
            let req = req.as_str().unwrap();
            if !obj.contains_key(req) {
                return fail(format!("missing required {req}"));
            }
        }
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => validate(doc, ps, val, &format!("{at}.{k}"))?,
                None if s.get("additionalProperties") == Some(&json!(false)) => {
                    return fail(format!("undocumented property {k}"))
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// One request to send: an operation with one of its examples.
struct Case {
    method: String,
    path: String,
    /// `METHOD /template example-name`, for messages.
    label: String,
    body: Option<Json>,
    body_schema: Option<Json>,
    action: String,
    /// The operation object.
    op: Json,
}

fn cases(doc: &Json) -> Vec<Case> {
    let mut out = Vec::new();
    for (template, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().unwrap() {
            let mut path = template.clone();
            for p in op["parameters"].as_array().into_iter().flatten() {
                let p = resolve(doc, p);
                if p["in"] == "path" {
                    let name = p["name"].as_str().unwrap();
                    let example = p["example"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{template}: parameter {name} has no example"));
                    path = path.replace(&format!("{{{name}}}"), example);
                }
            }
            assert!(!path.contains('{'), "{template}: unfilled parameter");
            let method = method.to_ascii_uppercase();
            let op_action = op["x-vmm-action"].as_str().map(str::to_string);
            let media = &op["requestBody"]["content"]["application/json"];
            let mut examples = Vec::new();
            if media.is_null() {
                examples.push(("-".to_string(), None, op_action.clone()));
            } else if let Some(ex) = media.get("example") {
                examples.push(("example".into(), Some(ex.clone()), op_action.clone()));
            } else {
                let named = media["examples"].as_object().unwrap_or_else(|| {
                    panic!("{method} {template}: request body without an example")
                });
                for (name, ex) in named {
                    let ex = resolve(doc, ex);
                    let action = ex["x-vmm-action"]
                        .as_str()
                        .map(str::to_string)
                        .or_else(|| op_action.clone());
                    examples.push((name.clone(), Some(ex["value"].clone()), action));
                }
            }
            for (name, body, action) in examples {
                let label = format!("{method} {template} {name}");
                out.push(Case {
                    action: action.unwrap_or_else(|| panic!("{label}: no x-vmm-action")),
                    method: method.clone(),
                    path: path.clone(),
                    body_schema: body.as_ref().map(|_| media["schema"].clone()),
                    body,
                    label,
                    op: op.clone(),
                });
            }
        }
    }
    out
}

fn documented(doc: &Json, op: &Json, status: u16) -> Option<Json> {
    op["responses"]
        .get(status.to_string())
        .map(|r| resolve(doc, r).clone())
}

// ---- the tests ------------------------------------------------------------------------

#[test]
fn every_documented_operation_reaches_its_action() {
    let doc = spec();
    let h = Harness::new(test_config());
    let mut reached = BTreeSet::new();
    for case in cases(&doc) {
        let label = &case.label;
        let body = case.body.as_ref().map(|b| b.to_string());
        if let (Some(b), Some(schema)) = (&case.body, &case.body_schema) {
            validate(&doc, schema, b, label).unwrap_or_else(|e| panic!("example: {e}"));
        }
        let reply = http(
            &h.sock,
            &case.method,
            &case.path,
            body.as_deref().map(str::as_bytes),
        );
        let response = documented(&doc, &case.op, reply.status)
            .unwrap_or_else(|| panic!("{label}: undocumented status {reply:?}"));
        assert!(
            reply.status == 200 || reply.status == 204,
            "{label}: {reply:?}"
        );
        assert_eq!(h.received().kind(), case.action, "{label}");
        reached.insert(case.action.clone());
        match response["content"]["application/json"].get("schema") {
            Some(schema) => {
                assert_eq!(reply.status, 200, "{label}");
                validate(&doc, schema, &reply.json(), label)
                    .unwrap_or_else(|e| panic!("answer: {e}"));
            }
            None => assert!(reply.body.is_empty(), "{label}: {reply:?}"),
        }
        for status in [500, 503, 504] {
            assert!(
                documented(&doc, &case.op, status).is_some(),
                "{label}: {status}"
            );
        }
    }
    let all: BTreeSet<String> = ALL_ACTIONS.iter().map(|s| s.to_string()).collect();
    assert_eq!(reached, all, "actions the document does not reach");

    // The VMM's own refusals go through as documented.
    h.set_mode(CONFLICT);
    for case in cases(&doc) {
        if documented(&doc, &case.op, 409).is_none() {
            continue;
        }
        let body = case.body.as_ref().map(|b| b.to_string());
        let reply = http(
            &h.sock,
            &case.method,
            &case.path,
            body.as_deref().map(str::as_bytes),
        );
        reply.fault(409, &[&case.action, "not possible"]);
        assert_eq!(h.received().kind(), case.action);
    }
}

#[test]
fn undocumented_paths_and_methods_are_refused() {
    let doc = spec();
    let h = Harness::new(test_config());
    for path in [
        "/foo",
        "/drives",
        "/drives/a/b",
        "/network-interfaces",
        "/snapshot",
        "/vm/config/x",
        "/machine-config/x",
        "/version",
        "/mmds",
        "/balloon",
        "/cpu-config",
        "/logger",
    ] {
        assert!(doc["paths"].get(path).is_none(), "{path} is documented");
        http(&h.sock, "GET", path, None).fault(404, &["no such endpoint"]);
        http(&h.sock, "PUT", path, Some(b"{}")).fault(404, &["no such endpoint"]);
    }
    for case in cases(&doc) {
        let template = case.label.split(' ').nth(1).unwrap();
        let item = &doc["paths"][template];
        let listed: BTreeSet<String> = item
            .as_object()
            .unwrap()
            .keys()
            .map(|m| m.to_ascii_uppercase())
            .collect();
        for method in METHODS.iter().filter(|m| !listed.contains(**m)) {
            let reply = http(&h.sock, method, &case.path, Some(b"{}"));
            reply.fault(405, &[method]);
            let allow = reply
                .headers
                .lines()
                .find_map(|l| l.strip_prefix("allow: "))
                .unwrap_or_else(|| panic!("no Allow header: {reply:?}"));
            let allow: BTreeSet<String> =
                allow.split(", ").map(|m| m.to_ascii_uppercase()).collect();
            assert_eq!(allow, listed, "{method} {}", case.path);
        }
    }
    h.assert_nothing_received();
}

#[test]
fn client_errors_name_the_problem() {
    let h = Harness::new(test_config());
    let put = |path: &str, body: &str| http(&h.sock, "PUT", path, Some(body.as_bytes()));
    // Malformed JSON: serde's message with line and column.
    put("/boot-source", "{\"kernel_image_path\": \"/k\",\n  oops}")
        .fault(400, &["boot-source", "line 2", "column"]);
    // Unknown field, named.
    put(
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128, "vcpus": 2}"#,
    )
    .fault(400, &["unknown field `vcpus`"]);
    // Wrong type and wrong content.
    put(
        "/machine-config",
        r#"{"vcpu_count": "one", "mem_size_mib": 128}"#,
    )
    .fault(400, &["invalid type"]);
    put("/actions", r#"{"action_type": "Reboot"}"#).fault(400, &["unknown variant `Reboot`"]);
    // The path names the drive; a body naming another is refused.
    put(
        "/drives/data",
        r#"{"drive_id": "rootfs", "path_on_host": "/img"}"#,
    )
    .fault(400, &["\"data\"", "\"rootfs\""]);
    put("/boot-source", "").fault(400, &["JSON object"]);
    // Too large: 413 before any parsing.
    let big = format!(r#"{{"boot_args": "{}"}}"#, "x".repeat(64 * 1024));
    put("/boot-source", &big).fault(413, &["larger than 65536 bytes"]);
    // Chunked bodies are limited too.
    let mut raw =
        b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        raw.extend_from_slice(format!("1000\r\n{}\r\n", "x".repeat(0x1000)).as_bytes());
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    send_raw(&h.sock, &raw).fault(413, &["larger than"]);
    // Not HTTP at all: hyper answers 400 and nothing reaches the VMM.
    let reply = send_raw(&h.sock, b"HELLO\r\n\r\n");
    assert_eq!(reply.status, 400, "{reply:?}");
    h.assert_nothing_received();
}

#[test]
fn curl_reads_the_instance_info() {
    let h = Harness::new(test_config());
    let reply = http(&h.sock, "GET", "/", None);
    assert_eq!(reply.status, 200, "{reply:?}");
    let info: InstanceInfo = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(
        (info.id.as_str(), info.state.as_str()),
        ("mock-vm", "Not started")
    );
    assert_eq!(h.received(), VmmAction::GetInstanceInfo);
    // The same with curl, the way an operator would, when curl is installed.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--unix-socket"])
        .arg(&h.sock)
        .arg("http://localhost/")
        .output();
    match out {
        Ok(out) => {
            assert!(out.status.success(), "{out:?}");
            let info: InstanceInfo = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(info.app_name, "vmm");
            assert_eq!(h.received(), VmmAction::GetInstanceInfo);
        }
        Err(e) => eprintln!("curl not run ({e}); the raw request above covers GET /"),
    }
}

#[test]
fn vmm_gone_is_503() {
    // The event loop has exited: its receiver is gone.
    let sock = temp_sock("gone.sock");
    let (tx, rx) = channel();
    drop(rx);
    let server = ApiServer::start(&sock, tx, EventFd::new(0).unwrap()).unwrap();
    http(&sock, "GET", "/", None).fault(503, &["not running"]);
    // Parsing still answers first.
    http(&sock, "PUT", "/vsock", Some(b"{")).fault(400, &["vsock"]);
    drop(server);
    assert!(!sock.exists());

    // The VMM drops a request without answering (shutting down).
    let h = Harness::new(test_config());
    h.set_mode(DROP);
    http(&h.sock, "PATCH", "/vm", Some(br#"{"state": "Paused"}"#))
        .fault(503, &["without answering"]);
    assert_eq!(h.received(), VmmAction::Pause);
}

#[test]
fn slow_vmm_is_504_and_stalls_no_one() {
    let h = Harness::new(ApiServerConfig {
        reply_timeout: Duration::from_secs(2),
        ..test_config()
    });
    h.set_mode(HANG);
    let sock = h.sock.clone();
    let slow = std::thread::spawn(move || {
        http(
            &sock,
            "PUT",
            "/actions",
            Some(br#"{"action_type": "InstanceStart"}"#),
        )
    });
    assert_eq!(h.received(), VmmAction::InstanceStart);
    h.set_mode(OK);
    let t = Instant::now();
    assert_eq!(http(&h.sock, "GET", "/metrics", None).status, 200);
    // Answered before the hung request's 2 s deadline: it did not wait behind it. (The
    // margin is for a loaded machine; a stalled server would take at least 2 s.)
    assert!(
        t.elapsed() < Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );
    slow.join()
        .unwrap()
        .fault(504, &["did not answer within 2 s"]);
}

#[test]
fn slow_clients_stall_no_one() {
    let h = Harness::new(test_config());
    // Half a request line, and half a body, left hanging.
    let mut half_head = UnixStream::connect(&h.sock).unwrap();
    half_head.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
    let mut half_body = UnixStream::connect(&h.sock).unwrap();
    half_body
        .write_all(b"PUT /vsock HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"guest_")
        .unwrap();
    let t = Instant::now();
    assert_eq!(http(&h.sock, "GET", "/", None).status, 200);
    // Before the half-sent requests' 2 s deadline: they did not hold this one up.
    assert!(
        t.elapsed() < Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(h.received(), VmmAction::GetInstanceInfo);
    // Both are cut off after their deadline (2 s here): the body with 408, the head by
    // closing the connection.
    let mut out = String::new();
    half_body
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    half_body.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("fault_message"), "{out}");
    half_head
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    half_head.read_to_end(&mut rest).unwrap();
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    h.assert_nothing_received();
}

#[test]
fn socket_lifecycle() {
    let sock = temp_sock("life.sock");
    let start = |path: &Path| {
        let (tx, rx) = channel();
        std::mem::forget(rx);
        ApiServer::start(path, tx, EventFd::new(0).unwrap())
    };
    let server = start(&sock).unwrap();
    // std names a thread from inside it, just after it starts: allow it a moment.
    let thread_names = || -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut names = thread_names();
    while !names.iter().any(|n| n.trim() == "vmm_api") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        names = thread_names();
    }
    assert!(names.iter().any(|n| n.trim() == "vmm_api"), "{names:?}");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // A live listener is never taken over.
    match start(&sock) {
        Err(ApiServerError::InUse(p)) => assert_eq!(p, sock),
        other => panic!("{other:?}"),
    }
    assert!(sock.exists());
    drop(server);
    assert!(!sock.exists(), "Drop removes the socket");
    // A stale socket (its process died) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let server = start(&sock).unwrap();
    assert_eq!(http(&sock, "GET", "/nope", None).status, 404);
    drop(server);
    // Anything else at the path is left alone.
    std::fs::write(&sock, b"not a socket").unwrap();
    match start(&sock) {
        Err(e @ ApiServerError::NotASocket(_)) => {
            assert!(e.to_string().contains("life.sock"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&sock).unwrap(), b"not a socket");
    let missing = Path::new("/nonexistent/dir/api.sock");
    assert!(matches!(
        start(missing),
        Err(ApiServerError::Socket { what: "bind", .. })
    ));
}
