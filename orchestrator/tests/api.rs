//! The control API on this machine, without VMs: the daemon's router served on a temporary
//! unix socket with a temporary database. Manifests CRUD, field-level errors, refusals that
//! create nothing, events, metrics, and every path of `api/openapi.yaml` routed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrator::client::Client;
use orchestrator::daemon::{Config, Daemon, Latencies};
use orchestrator::store::Store;
use serde_json::{json, Value};

struct Api {
    dir: PathBuf,
    client: Client,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(name: &str) -> Api {
    let dir = std::env::temp_dir().join(format!("orch-api-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = Config {
        state_dir: dir.join("state"),
        socket: dir.join("o.sock"),
        socket_gid: None,
        tcp: None,
        token: None,
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
    let daemon = Arc::new(Daemon {
        config,
        store: Mutex::new(store),
        vm_locks: Mutex::new(HashMap::new()),
        latencies: Mutex::new(Latencies::default()),
    });
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(orchestrator::daemon::api::serve(daemon))
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
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
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
    let (st, _, text) = api.call("POST", "/v1/vms/none/exec", Some(r#"{"argv": []}"#));
    assert_eq!(st, 400, "{text}");
    let (st, _, text) = api.call("POST", "/v1/vms/none/exec", Some(r#"{"argv": ["ls"]}"#));
    assert_eq!(st, 404, "{text}");
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
    assert_eq!(paths.len(), 10, "{:?}", paths.keys());
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
