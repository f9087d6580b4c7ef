//! The control API: REST + JSON over the unix control socket (and optionally TCP with a
//! bearer token), built on axum. Endpoints are listed in `orchestrator/openapi.yaml` and the
//! README. Errors are `{"error": {"kind", "message", "fields": [{"path", "reason"}]}}` with
//! a 4xx/5xx status; a bad manifest or body never creates anything.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::{json, Value};

use super::vm::{self, ErrorKind, OpError};
use super::Daemon;
use super::{exec, forward, hibernate};
use crate::manifest::{FieldError, Manifest, MAX_MANIFEST_BYTES};
use crate::store::VmState;

type Shared = Arc<Daemon>;

/// The largest request body: a manifest at its limit, with room for the rest.
const MAX_BODY_BYTES: usize = MAX_MANIFEST_BYTES + 4096;

impl IntoResponse for OpError {
    fn into_response(self) -> Response {
        let status = match self.kind {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let kind = match self.kind {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Internal => "internal",
        };
        error_response(status, kind, &self.message, &self.fields)
    }
}

/// The one shape of every error answer: `{"error": {"kind", "message", "fields"}}`.
fn error_response(
    status: StatusCode,
    kind: &str,
    message: &str,
    fields: &[FieldError],
) -> Response {
    let body = json!({"error": {"kind": kind, "message": message, "fields": fields}});
    (status, axum::Json(body)).into_response()
}

/// Gives the answers axum makes by itself (a wrong method, a body over the limit, a path
/// or query it cannot decode) the same JSON shape as the handlers' errors. Their text
/// becomes the message, and a 405 names the methods its `Allow` header lists.
async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let allow = parts
        .headers
        .get(header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (kind, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            format!("method {method} is not served here; allowed: {allow}"),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large",
            format!("request body over the {MAX_BODY_BYTES} byte limit"),
        ),
        StatusCode::NOT_FOUND => ("not_found", text),
        s if s.is_server_error() => ("internal", text),
        _ => ("bad_request", text),
    };
    let message = if message.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        message
    };
    let mut out = error_response(status, kind, &message, &[]);
    if let Some(v) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, v.clone());
    }
    out
}

fn bad_body(e: serde_json::Error) -> OpError {
    let path = if e.is_syntax() || e.is_eof() {
        String::new()
    } else {
        // serde_json names the field in its message ("unknown field `x`", "missing field").
        String::from("body")
    };
    OpError {
        kind: ErrorKind::BadRequest,
        message: format!("invalid request body: {e}"),
        fields: vec![FieldError {
            path,
            reason: e.to_string(),
        }],
    }
}

/// Parses a JSON body into `T`, naming the field at fault.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, OpError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            return bad_body(inner);
        }
        OpError {
            kind: ErrorKind::BadRequest,
            message: format!("invalid request body: {path}: {inner}"),
            fields: vec![FieldError {
                path,
                reason: inner.to_string(),
            }],
        }
    })
}

/// Runs blocking work (SQLite, the jailer, agents) off the async threads.
async fn blocking<T: Send + 'static>(
    d: &Shared,
    f: impl FnOnce(&Daemon) -> Result<T, OpError> + Send + 'static,
) -> Result<T, OpError> {
    let d = Arc::clone(d);
    tokio::task::spawn_blocking(move || f(&d))
        .await
        .map_err(|e| OpError::new(ErrorKind::Internal, format!("task failed: {e}")))?
}

fn manifest_json(r: &crate::store::ManifestRecord) -> Value {
    json!({
        "name": r.name,
        "hash": r.hash,
        "created_at_ms": r.created_at_ms,
        "manifest": r.manifest.to_value(),
    })
}

async fn info(State(d): State<Shared>) -> Result<axum::Json<Value>, OpError> {
    let subnet = d.config.subnet;
    let usage = blocking(&d, move |d| Ok(d.with_store(|s| s.lease_usage(&subnet))?)).await?;
    Ok(axum::Json(json!({
        "name": "orchestrator",
        "version": env!("CARGO_PKG_VERSION"),
        "subnet": subnet.to_string(),
        "gateway": subnet.gateway().to_string(),
        "leases": usage,
    })))
}

async fn list_manifests(State(d): State<Shared>) -> Result<axum::Json<Value>, OpError> {
    let list = blocking(&d, |d| Ok(d.with_store(|s| s.list_manifests())?)).await?;
    Ok(axum::Json(Value::Array(
        list.iter().map(manifest_json).collect(),
    )))
}

async fn add_manifest(State(d): State<Shared>, body: Bytes) -> Result<Response, OpError> {
    let m = Manifest::parse(&body).map_err(|e| OpError {
        kind: ErrorKind::BadRequest,
        message: format!("invalid manifest: {e}"),
        fields: e.errors().to_vec(),
    })?;
    let rec = blocking(&d, move |d| Ok(d.with_store(|s| s.add_manifest(&m))?)).await?;
    Ok((StatusCode::CREATED, axum::Json(manifest_json(&rec))).into_response())
}

async fn get_manifest(
    State(d): State<Shared>,
    Path(name): Path<String>,
) -> Result<axum::Json<Value>, OpError> {
    let rec = blocking(&d, move |d| Ok(d.with_store(|s| s.get_manifest(&name))?)).await?;
    Ok(axum::Json(manifest_json(&rec)))
}

async fn remove_manifest(
    State(d): State<Shared>,
    Path(name): Path<String>,
) -> Result<StatusCode, OpError> {
    blocking(&d, move |d| Ok(d.with_store(|s| s.remove_manifest(&name))?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_vms(State(d): State<Shared>) -> Result<axum::Json<Value>, OpError> {
    let list = blocking(&d, |d| Ok(d.with_store(|s| s.list_vms())?)).await?;
    Ok(axum::Json(json!(list)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    manifest: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    port_forward: Option<crate::store::PortForward>,
}

async fn create_vm(State(d): State<Shared>, body: Bytes) -> Result<Response, OpError> {
    let b: CreateBody = parse_body(&body)?;
    let id = b.id.clone().unwrap_or_else(vm::new_vm_id);
    vm::check_id(&id)?;
    let lock = d.vm_lock(&id);
    let _g = lock.lock().await;
    // The forward's host port is taken before the VM is made: one in use fails the create
    // with nothing made. A create that would fail on its manifest binds no port.
    let listener = match b.port_forward {
        Some(pf) => {
            let name = b.manifest.clone();
            blocking(&d, move |d| Ok(d.with_store(|s| s.get_manifest(&name))?)).await?;
            Some((pf, forward::bind(&id, pf)?))
        }
        None => None,
    };
    let pf = b.port_forward;
    let rec = blocking(&d, move |d| {
        let rec = vm::create(d, &b.manifest, Some(id.clone()))?;
        if pf.is_some() {
            d.with_store(|s| s.set_port_forward(&id, pf))?;
            return Ok(d.with_store(|s| s.get_vm(&id))?);
        }
        Ok(rec)
    })
    .await?;
    vm::watch(Arc::clone(&d), rec.id.clone());
    if let Some((pf, l)) = listener {
        forward::spawn(&d, &rec.id, pf, l);
    }
    Ok((StatusCode::CREATED, axum::Json(json!(rec))).into_response())
}

async fn get_vm(
    State(d): State<Shared>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, OpError> {
    let rec = blocking(&d, move |d| Ok(d.with_store(|s| s.get_vm(&id))?)).await?;
    Ok(axum::Json(json!(rec)))
}

async fn destroy_vm(
    State(d): State<Shared>,
    Path(id): Path<String>,
) -> Result<StatusCode, OpError> {
    let lock = d.vm_lock(&id);
    let _g = lock.lock().await;
    blocking(&d, move |d| vm::destroy(d, &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn stop_vm(
    State(d): State<Shared>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, OpError> {
    let lock = d.vm_lock(&id);
    let _g = lock.lock().await;
    let rec = blocking(&d, move |d| vm::stop(d, &id)).await?;
    Ok(axum::Json(json!(rec)))
}

async fn hibernate_vm(
    State(d): State<Shared>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, OpError> {
    let lock = d.vm_lock(&id);
    let _g = lock.lock().await;
    let rec = blocking(&d, move |d| hibernate::hibernate(d, &id)).await?;
    Ok(axum::Json(json!(rec)))
}

async fn wake_vm(
    State(d): State<Shared>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, OpError> {
    let _busy = hibernate::ensure_awake(&d, &id).await?;
    let rec = blocking(&d, move |d| Ok(d.with_store(|s| s.get_vm(&id))?)).await?;
    if rec.state != VmState::Running {
        // Only a hibernated VM is woken; a stopped or crashed one stays as it is.
        return Err(OpError::new(
            ErrorKind::Conflict,
            format!("VM {} is {}, not hibernated", rec.id, rec.state),
        ));
    }
    Ok(axum::Json(json!(rec)))
}

#[derive(Deserialize)]
struct ExecQuery {
    #[serde(default)]
    stream: bool,
}

/// Runs a command. Without streaming, answers `{"stdout", "stderr", "code", "signal",
/// "timed_out"}` once it ends. With `?stream=true` (or `Accept: application/x-ndjson`),
/// answers 200 at once with NDJSON lines as output arrives: `{"stdout": text}`,
/// `{"stderr": text}`, then `{"exit": {"code", "signal", "timed_out"}}`, or `{"error":
/// message}` if it fails on the way. What fails before the command starts (a bad body, an
/// unknown or stopped VM, no agent) is a normal JSON error either way.
async fn exec_vm(
    State(d): State<Shared>,
    Path(id): Path<String>,
    query: Result<Query<ExecQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OpError> {
    let Query(q) = query.map_err(|e| OpError {
        kind: ErrorKind::BadRequest,
        message: format!("invalid query: {}", e.body_text()),
        fields: vec![FieldError {
            path: "stream".into(),
            reason: e.body_text(),
        }],
    })?;
    let stream = q.stream
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains(NDJSON));
    let b: exec::ExecBody = parse_body(&body)?;
    if b.argv.is_empty() {
        return Err(OpError {
            kind: ErrorKind::BadRequest,
            message: "argv is empty".into(),
            fields: vec![FieldError {
                path: "argv".into(),
                reason: "needs at least the program".into(),
            }],
        });
    }
    let busy = hibernate::ensure_awake_for_agent(&d, &id).await?;
    if !stream {
        let out = blocking(&d, move |d| exec::exec(d, &id, &b)).await?;
        drop(busy);
        return Ok(axum::Json(json!(out)).into_response());
    }
    let prepared = blocking(&d, move |d| exec::prepare(d, &id, &b)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::task::spawn_blocking(move || {
        exec::run_streaming(prepared, |line| tx.blocking_send(line).is_ok());
    });
    // The VM stays busy (not hibernated) until the stream ends or the client goes away.
    let lines = futures_util::stream::unfold((rx, busy), |(mut rx, busy)| async move {
        let line = rx.recv().await?;
        Some((Ok::<_, Infallible>(line), (rx, busy)))
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, NDJSON)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(lines))
        .unwrap_or_default())
}

/// Newline-delimited JSON, one object per line.
const NDJSON: &str = "application/x-ndjson";

#[derive(Deserialize)]
struct LogsQuery {
    #[serde(default)]
    offset: u64,
}

async fn vm_logs(
    State(d): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<axum::Json<Value>, OpError> {
    let _busy = hibernate::ensure_awake_for_agent(&d, &id).await?;
    let logs = blocking(&d, move |d| exec::logs(d, &id, q.offset)).await?;
    Ok(axum::Json(json!(logs)))
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    since: i64,
    #[serde(default)]
    follow: bool,
}

/// Events after `since`: a JSON array, or with `follow=true` (or `Accept:
/// text/event-stream`) a Server-Sent Events stream that stays open, one `data:` line of
/// JSON per event, `id:` = its sequence number.
async fn events(
    State(d): State<Shared>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, OpError> {
    let sse = q.follow
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/event-stream"));
    if !sse {
        let since = q.since;
        let list = blocking(&d, move |d| {
            Ok(d.with_store(|s| s.events_since(since, 1000))?)
        })
        .await?;
        return Ok(axum::Json(json!(list)).into_response());
    }
    let stream =
        futures_util::stream::unfold((d, q.since, true), |(d, mut after, first)| async move {
            if !first {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let d2 = Arc::clone(&d);
            let list = tokio::task::spawn_blocking(move || {
                d2.with_store(|s| s.events_since(after, 256))
                    .unwrap_or_default()
            })
            .await
            .unwrap_or_default();
            let mut chunk = String::new();
            if first {
                // Tells the client the stream is live before any event.
                chunk.push_str(": connected\n\n");
            }
            for e in &list {
                after = after.max(e.seq);
                let data = serde_json::to_string(e).unwrap_or_default();
                chunk.push_str(&format!(
                    "id: {}\nevent: {}\ndata: {data}\n\n",
                    e.seq, e.kind
                ));
            }
            Some((Ok::<_, Infallible>(Bytes::from(chunk)), (d, after, false)))
        });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_default())
}

/// Prometheus text format.
async fn metrics(State(d): State<Shared>) -> Result<Response, OpError> {
    let subnet = d.config.subnet;
    let (vms, usage) = blocking(&d, move |d| {
        Ok(d.with_store(|s| {
            Ok::<_, crate::store::StoreError>((s.list_vms()?, s.lease_usage(&subnet)?))
        })?)
    })
    .await?;
    let mut out = String::new();
    out.push_str("# HELP orchestrator_vms VMs by state.\n# TYPE orchestrator_vms gauge\n");
    for st in VmState::ALL {
        let n = vms.iter().filter(|v| v.state == st).count();
        out.push_str(&format!("orchestrator_vms{{state=\"{st}\"}} {n}\n"));
    }
    out.push_str("# HELP orchestrator_leases_used Leased addresses.\n# TYPE orchestrator_leases_used gauge\n");
    out.push_str(&format!("orchestrator_leases_used {}\n", usage.used));
    out.push_str("# HELP orchestrator_leases_total Leasable addresses.\n# TYPE orchestrator_leases_total gauge\n");
    out.push_str(&format!("orchestrator_leases_total {}\n", usage.total));
    let (create, destroy, hib, wake, hibernations, wakes) = {
        let g = d.latencies.lock().unwrap_or_else(|p| p.into_inner());
        (
            g.create.clone(),
            g.destroy.clone(),
            g.hibernate.clone(),
            g.wake.clone(),
            g.hibernations,
            g.wakes,
        )
    };
    for (name, what, n) in [
        (
            "hibernations",
            "Hibernations since the daemon started.",
            hibernations,
        ),
        (
            "wakes",
            "Wakes (snapshot restores) since the daemon started.",
            wakes,
        ),
    ] {
        out.push_str(&format!(
            "# HELP orchestrator_{name}_total {what}\n# TYPE orchestrator_{name}_total counter\norchestrator_{name}_total {n}\n"
        ));
    }
    for (name, what, samples) in [
        ("create", "VM create to running", &create),
        ("destroy", "VM destroy", &destroy),
        ("hibernate", "VM hibernate (pause to VMM stopped)", &hib),
        ("wake", "VM wake (restore to agent answering)", &wake),
    ] {
        out.push_str(&format!(
            "# HELP orchestrator_{name}_seconds {what} latency (last 1024).\n# TYPE orchestrator_{name}_seconds summary\n"
        ));
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        for q in [0.5, 0.99] {
            if let Some(v) = quantile(&sorted, q) {
                out.push_str(&format!(
                    "orchestrator_{name}_seconds{{quantile=\"{q}\"}} {v:.6}\n"
                ));
            }
        }
        out.push_str(&format!(
            "orchestrator_{name}_seconds_sum {:.6}\norchestrator_{name}_seconds_count {}\n",
            sorted.iter().sum::<f64>(),
            sorted.len()
        ));
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        out,
    )
        .into_response())
}

fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    // Nearest rank: the smallest sample with at least a fraction q of samples at or below.
    let n = sorted.len();
    let rank = (1..=n).find(|&k| k as f64 >= q * n as f64).unwrap_or(n);
    sorted.get(rank - 1).copied()
}

async fn not_found() -> OpError {
    OpError::new(
        ErrorKind::NotFound,
        "no such endpoint (see GET /v1 and the README)",
    )
}

/// The router, shared by both listeners.
pub fn router(d: Shared) -> Router {
    // The JSON layer wraps the whole inner router, so it sees a 405 after the method router
    // has added its `Allow` header.
    Router::new()
        .fallback_service(routes(d))
        .layer(axum::middleware::from_fn(json_errors))
}

/// Every endpoint, with its handlers.
fn routes(d: Shared) -> Router {
    Router::new()
        .route("/v1", get(info))
        .route("/v1/manifests", get(list_manifests).post(add_manifest))
        .route(
            "/v1/manifests/{name}",
            get(get_manifest).delete(remove_manifest),
        )
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{id}", get(get_vm).delete(destroy_vm))
        .route("/v1/vms/{id}/stop", post(stop_vm))
        .route("/v1/vms/{id}/hibernate", post(hibernate_vm))
        .route("/v1/vms/{id}/wake", post(wake_vm))
        .route("/v1/vms/{id}/exec", post(exec_vm))
        .route("/v1/vms/{id}/logs", get(vm_logs))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(d)
}

/// TCP clients must send `Authorization: Bearer <token>`.
async fn require_token(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return error_response(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
            &[],
        );
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Binds the control socket (mode 0660, root:socket group) and the optional TCP listener,
/// and serves until SIGTERM/SIGINT.
pub async fn serve(d: Shared) -> anyhow::Result<()> {
    let sock = d.config.socket.clone();
    if let Some(parent) = sock.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    match std::os::unix::net::UnixStream::connect(&sock) {
        Ok(_) => anyhow::bail!("{}: another orchestrator is serving there", sock.display()),
        Err(_) => {
            let _ = std::fs::remove_file(&sock);
        }
    }
    let listener = tokio::net::UnixListener::bind(&sock)
        .with_context(|| format!("bind {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", sock.display()))?;
    if let Some(gid) = d.config.socket_gid {
        std::os::unix::fs::chown(&sock, None, Some(gid))
            .with_context(|| format!("chown {}", sock.display()))?;
    }
    let app = router(Arc::clone(&d));
    if let (Some(addr), Some(token)) = (d.config.tcp, d.config.token.clone()) {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind {addr}"))?;
        let app = app.clone().layer(axum::middleware::from_fn_with_state(
            Arc::new(token),
            require_token,
        ));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = tcp.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                serve_conn(TokioIo::new(stream), app.clone());
            }
        });
        eprintln!("orchestrator: also serving TCP on {addr} (bearer token required)");
    }
    eprintln!("orchestrator: serving on {}", sock.display());
    let own_uid = nix::unistd::geteuid().as_raw();
    let allowed_gid = d.config.socket_gid;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        // The socket's mode already limits who connects; the peer's credentials are
        // checked as well, so a socket whose mode was loosened by hand does not open up.
        let ok = stream.peer_cred().is_ok_and(|c| {
            c.uid() == 0 || c.uid() == own_uid || allowed_gid.is_some_and(|g| c.gid() == g)
        });
        if !ok {
            continue;
        }
        serve_conn(TokioIo::new(stream), app.clone());
    }
    let _ = std::fs::remove_file(&sock);
    eprintln!("orchestrator: stopped (VMs keep running; a restart re-adopts them)");
    Ok(())
}

fn serve_conn<I>(io: TokioIo<I>, app: Router)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    tokio::spawn(async move {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await;
    });
}
