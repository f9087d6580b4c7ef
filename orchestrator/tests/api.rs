//! The control API on this machine, without VMs: the daemon's router served on a temporary
//! unix socket (and TCP with a bearer token) with a temporary database. Manifests CRUD,
//! field-level errors, refusals that create nothing, events, metrics, every path of
//! `api/openapi.yaml` routed, and streaming exec against a fake guest agent.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use orchestrator::client::Client;
use orchestrator::daemon::{Config, Daemon};
use orchestrator::store::Store;
use serde_json::{json, Value};

struct Api {
    dir: PathBuf,
    client: Client,
    daemon: Arc<Daemon>,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(name: &str) -> Api {
    start_with(name, None)
}

/// The router on a temporary socket, and on TCP `addr` with `token` if given.
fn start_with(name: &str, tcp: Option<(std::net::SocketAddr, &str)>) -> Api {
    let dir = std::env::temp_dir().join(format!("orch-api-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = Config {
        state_dir: dir.join("state"),
        socket: dir.join("o.sock"),
        socket_gid: None,
        tcp: tcp.map(|t| t.0),
        token: tcp.map(|t| t.1.to_string()),
        subnet: "10.77.0.0/29".parse().unwrap(),
        bridge: "unused0".into(),
        jailer: "/nonexistent/jailer".into(),
        vmm: "/nonexistent/vmm".into(),
        uid_base: 20000,
        ready_timeout: Duration::from_secs(5),
    };
    std::fs::create_dir_all(&config.state_dir).unwrap();
    let store = Store::open(&config.db_path()).unwrap();
    let sock = config.socket.clone();
    let daemon = Arc::new(Daemon::new(config, store));
    let served = Arc::clone(&daemon);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(orchestrator::daemon::api::serve(served))
            .unwrap();
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(std::time::Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    Api {
        client: Client::new(&sock).unwrap(),
        dir,
        daemon,
    }
}

impl Api {
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value, String) {
        let a = self
            .client
            .request(
                method,
                path,
                body.map(str::as_bytes),
                Duration::from_secs(30),
            )
            .unwrap();
        (a.status, a.json(), a.body)
    }

    fn file(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, b"x").unwrap();
        p
    }
}

/// One HTTP/1.1 request on a fresh connection, written by a second thread (write errors
/// ignored) while this one reads the whole answer.
fn raw_request(sock: &std::path::Path, method: &str, path: &str, body: String) -> String {
    raw_request_with(sock, method, path, "", body)
}

/// [`raw_request`] with extra header lines (`extra` ends each with `\r\n`).
fn raw_request_with(
    sock: &std::path::Path,
    method: &str,
    path: &str,
    extra: &str,
    body: String,
) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(head.as_bytes());
        let _ = w.write_all(body.as_bytes());
    });
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let _ = writer.join();
    String::from_utf8_lossy(&out).into_owned()
}

fn manifest(api: &Api, name: &str) -> Value {
    json!({
        "schema": 1,
        "name": name,
        "kernel": api.file("vmlinux"),
        "rootfs": {"path": api.file("rootfs.ext4")},
        "entrypoint": "/bin/sh",
    })
}

#[test]
fn manifests_are_added_listed_shown_and_removed() {
    let api = start("crud");
    let m = manifest(&api, "web");
    let (st, v, body) = api.call("POST", "/v1/manifests", Some(&m.to_string()));
    assert_eq!(st, 201, "{body}");
    assert_eq!(v["name"], "web");
    assert_eq!(v["hash"].as_str().unwrap().len(), 64);
    assert_eq!(v["manifest"]["memory_mib"], 128, "defaults filled in: {v}");
    let (st, _, body) = api.call("POST", "/v1/manifests", Some(&m.to_string()));
    assert_eq!(st, 409, "a second add is a conflict: {body}");
    let (st, v, _) = api.call("GET", "/v1/manifests", None);
    assert_eq!(st, 200);
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (st, v, _) = api.call("GET", "/v1/manifests/web", None);
    assert_eq!(
        (st, v["manifest"]["entrypoint"].clone()),
        (200, json!("/bin/sh"))
    );
    let (st, _, _) = api.call("DELETE", "/v1/manifests/web", None);
    assert_eq!(st, 204);
    let (st, v, _) = api.call("GET", "/v1/manifests/web", None);
    assert_eq!(st, 404);
    assert_eq!(v["error"]["kind"], "not_found");
    let (_, v, _) = api.call("GET", "/v1/events", None);
    let kinds: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["manifest_added", "manifest_removed"], "{v}");
}

#[test]
fn bad_manifests_and_bodies_are_refused_with_the_field_and_create_nothing() {
    let api = start("bad");
    let good = manifest(&api, "ok");
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("entrypoint");
    let mut wrong = good.clone();
    wrong["vcpus"] = json!("two");
    let mut range = good.clone();
    range["memory_mib"] = json!(1);
    let mut unknown = good.clone();
    unknown["colour"] = json!("blue");
    for (m, path) in [
        (missing, "entrypoint"),
        (wrong, "vcpus"),
        (range, "memory_mib"),
        (unknown, "colour"),
    ] {
        let (st, v, body) = api.call("POST", "/v1/manifests", Some(&m.to_string()));
        assert_eq!(st, 400, "{body}");
        assert_eq!(v["error"]["kind"], "bad_request");
        let paths: Vec<String> = v["error"]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["path"].as_str().unwrap().to_string())
            .collect();
        assert!(paths.iter().any(|p| p.contains(path)), "{path}: {body}");
    }
    let (st, _, body) = api.call("POST", "/v1/manifests", Some("{not json"));
    assert_eq!(st, 400, "{body}");
    // Over the limit: the server answers 413 as soon as it sees the length and closes
    // without reading the rest, so a client still writing may get EPIPE first. Send from
    // one thread and read the answer on another, as a patient client would.
    let huge = format!("{{\"x\": \"{}\"}}", "y".repeat(2 << 20));
    let answer = raw_request(&api.dir.join("o.sock"), "POST", "/v1/manifests", huge);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#""kind":"payload_too_large""#), "{answer}");
    // What axum answers by itself has the same JSON shape: a wrong method (naming the
    // methods served), a path segment that is not UTF-8 once decoded, a bad query.
    let (st, v, body) = api.call("PUT", "/v1/vms", Some("{}"));
    assert_eq!(st, 405, "{body}");
    assert_eq!(v["error"]["kind"], "method_not_allowed", "{body}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("GET") && message.contains("POST"),
        "{body}"
    );
    let (st, v, body) = api.call("GET", "/v1/vms/%ff", None);
    assert_eq!(st, 400, "{body}");
    assert_eq!(v["error"]["kind"], "bad_request", "{body}");
    assert!(
        !v["error"]["message"].as_str().unwrap().is_empty(),
        "{body}"
    );
    let (st, v, body) = api.call("GET", "/v1/vms/x/logs?offset=minus", None);
    assert_eq!(st, 400, "{body}");
    assert_eq!(v["error"]["kind"], "bad_request", "{body}");

    // VM bodies: wrong types, unknown fields, unknown manifest, bad id, missing kernel.
    let mut nokernel = manifest(&api, "nokernel");
    nokernel["kernel"] = json!("/nonexistent/vmlinux");
    let (st, _, body) = api.call("POST", "/v1/manifests", Some(&nokernel.to_string()));
    assert_eq!(st, 201, "{body}");
    for (body, status, needle) in [
        (json!({"manifest": 7}), 400, "manifest"),
        (json!({"manifest": "nokernel", "extra": 1}), 400, "extra"),
        (json!({}), 400, "manifest"),
        (json!({"manifest": "missing"}), 404, "missing"),
        (json!({"manifest": "nokernel", "id": "bad id!"}), 400, "id"),
        (json!({"manifest": "nokernel"}), 400, "/nonexistent/vmlinux"),
    ] {
        let (st, _, text) = api.call("POST", "/v1/vms", Some(&body.to_string()));
        assert_eq!(st, status, "{body}: {text}");
        assert!(text.contains(needle), "{body}: {text}");
    }
    // A create that fails on its id or its manifest takes no host port: with the port held
    // here, binding it first would have answered 409.
    let held = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap();
    let port = held.local_addr().unwrap().port();
    let pf = json!({"host_port": port, "guest_port": 80});
    for (body, status, needle) in [
        (
            json!({"manifest": "missing", "port_forward": pf}),
            404,
            "missing",
        ),
        (
            json!({"manifest": "nokernel", "id": "bad id!", "port_forward": pf}),
            400,
            "id",
        ),
    ] {
        let (st, _, text) = api.call("POST", "/v1/vms", Some(&body.to_string()));
        assert_eq!(st, status, "{body}: {text}");
        assert!(text.contains(needle), "{body}: {text}");
    }
    drop(held);
    let (st, _, text) = api.call("POST", "/v1/vms/none/exec", Some(r#"{"argv": []}"#));
    assert_eq!(st, 400, "{text}");
    let (st, _, text) = api.call("POST", "/v1/vms/none/exec", Some(r#"{"argv": ["ls"]}"#));
    assert_eq!(st, 404, "{text}");
    // Ids nobody created leave nothing behind in the daemon.
    for i in 0..50 {
        for (method, path, body) in [
            (
                "POST",
                format!("/v1/vms/ghost-{i}/exec"),
                Some(r#"{"argv": ["ls"]}"#),
            ),
            ("POST", format!("/v1/vms/ghost-{i}/stop"), None),
            ("DELETE", format!("/v1/vms/ghost-{i}"), None),
        ] {
            let (st, _, text) = api.call(method, &path, body);
            assert_eq!(st, 404, "{method} {path}: {text}");
        }
    }
    assert!(
        api.daemon.vm_locks.len() <= 1,
        "{}",
        api.daemon.vm_locks.len()
    );
    assert!(
        api.daemon.agent_slots.len() <= 1,
        "{}",
        api.daemon.agent_slots.len()
    );
    let (_, v, _) = api.call("GET", "/v1/vms", None);
    assert_eq!(v, json!([]), "nothing was created");
    let (_, v, _) = api.call("GET", "/v1", None);
    assert_eq!(v["leases"], json!({"used": 0, "total": 5}), "{v}");
}

#[test]
fn every_documented_path_is_routed_and_metrics_are_prometheus_text() {
    let api = start("spec");
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/api/openapi.yaml")).unwrap();
    let spec: Value = serde_norway::from_str(&text).unwrap();
    let paths = spec["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 12, "{:?}", paths.keys());
    for (path, ops) in paths {
        let concrete = path.replace("{name}", "nosuch").replace("{id}", "nosuch");
        for method in ["get", "post", "delete"] {
            if ops.get(method).is_none() {
                continue;
            }
            let body = (method == "post").then_some("{}");
            let (st, v, text) = api.call(&method.to_uppercase(), &concrete, body);
            // Routed: any answer but the fallback's "no such endpoint".
            assert!(
                !text.contains("no such endpoint"),
                "{method} {path}: {st} {text}"
            );
            if st >= 400 {
                assert!(v["error"]["message"].is_string(), "{method} {path}: {text}");
            }
        }
    }
    let (st, _, text) = api.call("GET", "/v1/nothing", None);
    assert_eq!(st, 404, "{text}");
    let (st, _, text) = api.call("GET", "/metrics", None);
    assert_eq!(st, 200);
    for needle in [
        "orchestrator_vms{state=\"running\"} 0",
        "orchestrator_leases_total 5",
        "orchestrator_create_seconds_count 0",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
}

#[test]
fn events_stream_as_server_sent_events() {
    let api = start("sse");
    let sock = api.dir.join("o.sock");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let c = Client::new(&sock).unwrap();
        let mut seen = String::new();
        let _ = c.request_streaming(
            "GET",
            "/v1/events?follow=true",
            None,
            Duration::from_secs(30),
            |chunk| {
                seen.push_str(&String::from_utf8_lossy(chunk));
                let _ = tx.send(seen.clone());
                !seen.contains("event: manifest_added")
            },
        );
    });
    // The stream is live before the event happens.
    let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(first.starts_with(": connected"), "{first}");
    let m = manifest(&api, "live");
    let (st, _, body) = api.call("POST", "/v1/manifests", Some(&m.to_string()));
    assert_eq!(st, 201, "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut text = first;
    while !text.contains("event: manifest_added") {
        text = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or_else(|_| panic!("no event in the stream: {text}"));
    }
    let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let e: Value = serde_json::from_str(data).unwrap();
    assert_eq!(e["kind"], "manifest_added");
    assert_eq!(e["detail"]["name"], "live", "{e}");
    assert!(text.contains("id: 1\n"), "{text}");
}

/// The CLI against the API: tables by default, the API's JSON with --json, errors with the
/// field and a non-zero status.
#[test]
fn the_cli_prints_tables_json_and_field_errors() {
    let api = start("cli");
    let sock = api.dir.join("o.sock");
    let cli = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write;
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"))
            .arg("--socket")
            .arg(&sock)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = c.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(input);
        let out = c.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let m = manifest(&api, "clitest").to_string();
    let (code, out, err) = cli(&["manifests", "add", "-"], Some(&m));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("added manifest clitest ("), "{out}");
    let (code, out, _) = cli(&["manifests", "list"], None);
    assert_eq!(code, Some(0));
    let mut rows = out.lines();
    assert!(rows.next().unwrap().starts_with("NAME"), "{out}");
    assert!(rows.next().unwrap().starts_with("clitest "), "{out}");
    let (code, out, _) = cli(&["--json", "manifests", "list"], None);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "clitest");
    assert_eq!(v[0]["manifest"]["entrypoint"], "/bin/sh");
    let (code, out, _) = cli(&["--json", "vms", "list"], None);
    assert_eq!(
        (code, serde_json::from_str::<Value>(&out).unwrap()),
        (Some(0), json!([]))
    );
    let (code, out, _) = cli(&["vms", "list"], None);
    assert_eq!(code, Some(0));
    assert_eq!(out.trim(), "ID  STATE  MANIFEST  IP  MAC  PID");
    let mut bad: Value = serde_json::from_str(&m).unwrap();
    bad["vcpus"] = json!(99);
    bad["name"] = json!("bad");
    let (code, _, err) = cli(&["manifests", "add", "-"], Some(&bad.to_string()));
    assert_eq!(code, Some(1));
    assert!(err.contains("vcpus") && err.contains("(400)"), "{err}");
    let huge = format!("{{\"x\": \"{}\"}}", "y".repeat(2 << 20));
    let (code, _, err) = cli(&["manifests", "add", "-"], Some(&huge));
    assert_eq!(code, Some(1));
    assert!(err.contains("more than the 1048576 allowed"), "{err}");
    let (code, _, err) = cli(&["vms", "show", "vm-none"], None);
    assert_eq!(code, Some(1));
    assert!(err.contains("vm-none") && err.contains("(404)"), "{err}");
    let (code, _, err) = cli(&["vms", "exec", "vm-none", "--", "true"], None);
    assert_eq!(code, Some(1));
    assert!(err.contains("(404)"), "{err}");
    let missing = api.dir.join("missing.sock");
    let (code, _, err) = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .arg("--socket")
        .arg(&missing)
        .args(["vms", "list"])
        .output()
        .map(|o| {
            (
                o.status.code(),
                (),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap();
    assert_eq!(code, Some(1));
    assert!(
        err.contains("missing.sock") && err.contains("orchestrator serve"),
        "{err}"
    );
}

/// Runs the CLI against `sock`: (exit code, stdout, stderr).
fn run_cli(sock: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .arg("--socket")
        .arg(sock)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One request over TCP (`Connection: close`): status and body as JSON.
fn tcp_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status: {text}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn tcp_needs_the_bearer_token_and_the_unix_socket_does_not() {
    // A free port: bound here and released, then bound by the server.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let token = "s3cret-t0ken";
    let api = start_with("tcp", Some((addr, token)));
    // The TCP listener comes up just after the unix socket.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "nothing on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let right = format!("Bearer {token}");
    let longer = format!("Bearer {token}x");
    let same_length = format!("Bearer {}", "x".repeat(token.len()));
    for auth in [
        None,
        Some("Bearer wrong"),
        Some(same_length.as_str()),
        Some(longer.as_str()),
        Some("Bearer "),
        Some(token),
        Some("Basic czNjcmV0LXQwa2Vu"),
    ] {
        let (st, v) = tcp_request(addr, "GET", "/v1", auth, "");
        assert_eq!(st, 401, "{auth:?}: {v}");
        assert_eq!(v["error"]["kind"], "unauthorized", "{auth:?}: {v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    let (st, v) = tcp_request(addr, "GET", "/v1", Some(&right), "");
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["name"], "orchestrator", "{v}");
    // Refused before the handler: a write without the token creates nothing.
    let m = manifest(&api, "viatcp").to_string();
    let (st, _) = tcp_request(addr, "POST", "/v1/manifests", Some("Bearer nope"), &m);
    assert_eq!(st, 401);
    let (st, v) = tcp_request(addr, "GET", "/v1/manifests", Some(&right), "");
    assert_eq!((st, v), (200, json!([])));
    let (st, v) = tcp_request(addr, "POST", "/v1/manifests", Some(&right), &m);
    assert_eq!(st, 201, "{v}");
    // The unix socket is guarded by its mode and peer credentials, not the token.
    let (st, v, _) = api.call("GET", "/v1/manifests", None);
    assert_eq!(st, 200);
    assert_eq!(v[0]["name"], "viatcp", "{v}");
}

#[test]
fn streaming_exec_refusals_before_the_command_starts_are_plain_json_errors() {
    let api = start("stream-err");
    let sock = api.dir.join("o.sock");
    // An unknown VM: 404 as JSON, not a stream, whichever way streaming was asked for.
    for (path, extra) in [
        ("/v1/vms/vm-none/exec?stream=true", ""),
        ("/v1/vms/vm-none/exec", "Accept: application/x-ndjson\r\n"),
    ] {
        let answer = raw_request_with(&sock, "POST", path, extra, r#"{"argv":["ls"]}"#.into());
        assert!(answer.starts_with("HTTP/1.1 404"), "{path}: {answer}");
        let lower = answer.to_ascii_lowercase();
        assert!(
            lower.contains("content-type: application/json"),
            "{path}: {answer}"
        );
        let body = answer.split_once("\r\n\r\n").unwrap().1;
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["kind"], "not_found", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("vm-none"),
            "{v}"
        );
    }
    // Bad bodies and queries: 400 naming the field.
    for (path, body, field) in [
        (
            "/v1/vms/vm-none/exec?stream=true",
            r#"{"argv": []}"#,
            "argv",
        ),
        (
            "/v1/vms/vm-none/exec?stream=true",
            r#"{"argv": ["ls"], "colour": 1}"#,
            "colour",
        ),
        (
            "/v1/vms/vm-none/exec?stream=true",
            r#"{"argv": "ls"}"#,
            "argv",
        ),
        (
            "/v1/vms/vm-none/exec?stream=maybe",
            r#"{"argv": ["ls"]}"#,
            "stream",
        ),
    ] {
        let (st, v, text) = api.call("POST", path, Some(body));
        assert_eq!(st, 400, "{path} {body}: {text}");
        assert_eq!(v["error"]["kind"], "bad_request", "{text}");
        assert!(
            v["error"]["fields"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f.to_string().contains(field)),
            "{field}: {text}"
        );
    }
    // The CLI streams, and reports the refusal with its status.
    let (code, out, err) = run_cli(&sock, &["vms", "exec", "vm-none", "--", "true"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(err.contains("vm-none") && err.contains("(404)"), "{err}");
}

#[test]
fn hibernate_and_wake_of_an_unknown_vm_are_404_naming_it() {
    let api = start("hib404");
    for op in ["hibernate", "wake"] {
        let (st, v, text) = api.call("POST", &format!("/v1/vms/vm-ghost/{op}"), None);
        assert_eq!(st, 404, "{op}: {text}");
        assert_eq!(v["error"]["kind"], "not_found", "{op}: {text}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("vm-ghost"),
            "{op}: {text}"
        );
        let (code, out, err) = run_cli(&api.dir.join("o.sock"), &["vms", op, "vm-ghost"]);
        assert_eq!(code, Some(1), "{op}: {out}");
        assert!(
            err.contains("vm-ghost") && err.contains("(404)"),
            "{op}: {err}"
        );
    }
}

/// Serves one connection as guest-init's agent behind the VMM's hybrid vsock would:
/// `slow` prints "one", waits 1.5 s, prints "warn" on stderr and "two", and exits 3;
/// `utf8` writes an "é" cut in two chunks; anything else cannot be run.
fn fake_agent_connection(mut s: std::os::unix::net::UnixStream) {
    use agent::{ErrorCode, ErrorInfo, ExitInfo, HealthOk, HelloOk, Message};
    use std::io::{Read, Write};
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {}
    if s.write_all(b"OK 1073741824\n").is_err() {
        return;
    }
    let exit = |code| {
        Message::Exit(ExitInfo {
            code: Some(code),
            signal: None,
            timed_out: false,
        })
    };
    loop {
        let Ok(m) = agent::read_message(&mut s) else {
            return;
        };
        let script: Vec<Option<Message>> = match m {
            Message::Hello(_) => vec![Some(Message::HelloOk(HelloOk {
                version: agent::PROTOCOL_VERSION,
                agent_version: "fake".into(),
            }))],
            Message::Health(_) => vec![Some(Message::HealthOk(HealthOk {
                agent_version: "fake".into(),
                uptime_ms: 1,
            }))],
            Message::Exec(start) => match start.argv[0].as_str() {
                "slow" => vec![
                    Some(Message::Stdout(b"one\n".to_vec())),
                    None,
                    Some(Message::Stderr(b"warn\n".to_vec())),
                    Some(Message::Stdout(b"two\n".to_vec())),
                    Some(exit(3)),
                ],
                "utf8" => vec![
                    Some(Message::Stdout(vec![b'<', 0xC3])),
                    Some(Message::Stdout(vec![0xA9, b'>', b'\n'])),
                    Some(exit(0)),
                ],
                _ => vec![Some(Message::Error(ErrorInfo::new(
                    ErrorCode::ExecFailed,
                    "cannot run it",
                )))],
            },
            _ => return,
        };
        for step in script {
            match step {
                Some(m) => {
                    if agent::write_message(&mut s, &m).is_err() {
                        return;
                    }
                }
                None => std::thread::sleep(Duration::from_millis(1500)),
            }
        }
    }
}

/// A `running` VM `vm-fake` in the database whose jail's `v.sock` is a fake agent, and a
/// `stopped` one, `vm-off`.
fn fake_vm(api: &Api) {
    use orchestrator::store::VmState;
    let m = manifest(api, "fake");
    let (st, _, body) = api.call("POST", "/v1/manifests", Some(&m.to_string()));
    assert_eq!(st, 201, "{body}");
    let subnet = api.daemon.config.subnet;
    api.daemon.with_store(|s| {
        for (id, state) in [("vm-fake", VmState::Running), ("vm-off", VmState::Stopped)] {
            s.create_vm_with_lease(id, "fake", &subnet).unwrap();
            s.set_state(id, state).unwrap();
        }
    });
    let jail = api.dir.join("jail");
    let root = jail.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let vm_dir = api.daemon.config.vm_dir("vm-fake");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let report =
        json!({"jail_dir": jail, "jail_root": root, "pid": std::process::id(), "cgroups": []});
    std::fs::write(vm_dir.join("jail.json"), report.to_string()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(root.join("v.sock")).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || fake_agent_connection(s));
        }
    });
}

/// NDJSON lines of a streamed exec, each with when it arrived.
fn stream_exec(api: &Api, id: &str, argv: &[&str]) -> (u16, Vec<(Duration, Value)>) {
    let started = std::time::Instant::now();
    let body = json!({ "argv": argv }).to_string();
    let mut splitter = orchestrator::client::LineSplitter::default();
    let mut lines = Vec::new();
    let status = api
        .client
        .request_streaming(
            "POST",
            &format!("/v1/vms/{id}/exec?stream=true"),
            Some(body.as_bytes()),
            Duration::from_secs(30),
            |chunk| {
                splitter.push(chunk, |line| {
                    let v: Value = serde_json::from_slice(line).unwrap_or_else(|e| {
                        panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(line))
                    });
                    lines.push((started.elapsed(), v));
                    if lines.len() == 1 && argv == ["slow"] {
                        // Mid-stream (the fake agent waits after the first line), the VM
                        // is busy: not to be hibernated under it.
                        assert_eq!(api.daemon.activity(id).inflight, 1);
                    }
                });
                true
            },
        )
        .unwrap();
    assert!(
        splitter.rest().is_empty(),
        "a line without its newline: {:?}",
        String::from_utf8_lossy(splitter.rest())
    );
    (status, lines)
}

#[test]
fn exec_streams_ndjson_as_output_arrives_through_a_fake_agent() {
    let api = start("stream");
    fake_vm(&api);
    let sock = api.dir.join("o.sock");

    let (st, lines) = stream_exec(&api, "vm-fake", &["slow"]);
    assert_eq!(st, 200, "{lines:?}");
    let values: Vec<&Value> = lines.iter().map(|l| &l.1).collect();
    assert_eq!(
        values,
        [
            &json!({"stdout": "one\n"}),
            &json!({"stderr": "warn\n"}),
            &json!({"stdout": "two\n"}),
            &json!({"exit": {"code": 3, "signal": null, "timed_out": false}}),
        ]
    );
    // The first line came as it was written, not with the rest at the end.
    let gap = lines[3].0 - lines[0].0;
    assert!(gap >= Duration::from_millis(1000), "{lines:?}");
    // The stream's end releases the VM.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while api.daemon.activity("vm-fake").inflight != 0 {
        assert!(std::time::Instant::now() < deadline, "still busy");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Headers, and a character cut between two chunks kept whole.
    let answer = raw_request_with(
        &sock,
        "POST",
        "/v1/vms/vm-fake/exec",
        "Accept: application/x-ndjson\r\n",
        r#"{"argv":["utf8"]}"#.into(),
    );
    let lower = answer.to_ascii_lowercase();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        lower.contains("content-type: application/x-ndjson"),
        "{answer}"
    );
    assert!(lower.contains("transfer-encoding: chunked"), "{answer}");
    assert!(answer.contains("{\"stdout\":\"<\"}\n"), "{answer}");
    assert!(answer.contains("{\"stdout\":\"é>\\n\"}\n"), "{answer}");
    assert!(!answer.contains('\u{fffd}'), "{answer}");

    // A failure once the stream has begun is its last line.
    let (st, lines) = stream_exec(&api, "vm-fake", &["nosuch"]);
    assert_eq!(st, 200);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let msg = lines[0].1["error"].as_str().unwrap();
    assert!(
        msg.contains("vm-fake") && msg.contains("cannot run it"),
        "{msg}"
    );

    // Without streaming: the collected answer, as before.
    let (st, v, text) = api.call("POST", "/v1/vms/vm-fake/exec", Some(r#"{"argv":["slow"]}"#));
    assert_eq!(st, 200, "{text}");
    assert_eq!(
        v,
        json!({
            "stdout": "one\ntwo\n",
            "stderr": "warn\n",
            "code": 3,
            "signal": null,
            "timed_out": false,
        })
    );

    // The CLI prints the output as it comes and exits with the command's code.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .arg("--socket")
        .arg(&sock)
        .args(["vms", "exec", "vm-fake", "--", "slow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    let first_at = started.elapsed();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let status = child.wait().unwrap();
    let done_at = started.elapsed();
    assert_eq!((first.as_str(), rest.as_str()), ("one\n", "two\n"), "{err}");
    assert_eq!(err, "warn\n");
    assert_eq!(status.code(), Some(3));
    assert!(
        done_at - first_at >= Duration::from_millis(1000),
        "first line at {first_at:?}, end at {done_at:?}"
    );
    // --json: the one object of the collected answer.
    let (code, out, err) = run_cli(&sock, &["--json", "vms", "exec", "vm-fake", "--", "slow"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), v);
    // A failure in the stream: the message, status 1.
    let (code, _, err) = run_cli(&sock, &["vms", "exec", "vm-fake", "--", "nosuch"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot run it"), "{err}");

    // Wake: a running VM is answered as is; a stopped one is a conflict.
    let (st, v, text) = api.call("POST", "/v1/vms/vm-fake/wake", None);
    assert_eq!((st, v["state"].clone()), (200, json!("running")), "{text}");
    let (st, v, text) = api.call("POST", "/v1/vms/vm-off/wake", None);
    assert_eq!(st, 409, "{text}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("stopped"),
        "{text}"
    );
    let (code, out, err) = run_cli(&sock, &["vms", "wake", "vm-fake"]);
    assert_eq!(code, Some(0), "{err}");
    let mut rows = out.lines();
    assert!(rows.next().unwrap().starts_with("ID "), "{out}");
    assert!(
        rows.next().unwrap().starts_with("vm-fake  running "),
        "{out}"
    );
    let (code, out, _) = run_cli(&sock, &["--json", "vms", "wake", "vm-fake"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["id"],
        "vm-fake"
    );
}
