//! The `vmm_api` thread: binds the unix socket, serves HTTP/1.1 with hyper and axum on a
//! single-threaded tokio runtime, and hands each parsed request to the event loop.
//!
//! Nothing here waits on a client or on the VMM without a deadline: headers must arrive
//! within `header_timeout` (which also closes idle keep-alive connections), the body within
//! `body_timeout` and at most `max_body_bytes` long, and the VMM must answer within
//! `reply_timeout` (504 otherwise). At most `max_connections` connections are served at
//! once; more wait in the listen backlog.
//!
//! Under `vmm --seccomp-level 1|2` the thread installs the API seccomp filter
//! ([`ApiServer::start_filtered`]) before it serves its first request: from then on it
//! can only accept, read and write sockets, wait on epoll and hand requests over.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use seccomp::{SeccompLevel, ThreadKind};
use tokio::sync::{oneshot, Semaphore};
use vmm_sys_util::eventfd::EventFd;

use super::parse::{allowed_methods, parse_request, MAX_BODY_BYTES};
use super::{ApiError, ApiRequest, VmmData};

/// Errors starting the API server, each naming the socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Another process is listening on the socket.
    #[error("API socket {0} is in use by a running process")]
    InUse(PathBuf),
    /// Something other than a socket is at the path; it is not ours to remove.
    #[error("API socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// The path cannot be checked, cleared or bound.
    #[error("cannot {what} API socket {path}")]
    Socket {
        /// `inspect`, `remove stale`, `bind` or `set permissions on`.
        what: &'static str,
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The tokio runtime or the thread could not be created.
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
    /// The API thread's seccomp filter could not be installed.
    #[error("API thread")]
    Seccomp(#[source] seccomp::SeccompError),
}

/// Limits and deadlines; [`Default`] gives the production values.
#[derive(Debug, Clone)]
pub struct ApiServerConfig {
    /// Largest request body (413 above it).
    pub max_body_bytes: usize,
    /// Time for a client to send its request headers, and to send the next request on a
    /// keep-alive connection.
    pub header_timeout: Duration,
    /// Time for a client to send its body (408 after it).
    pub body_timeout: Duration,
    /// Time for the VMM to answer (504 after it).
    pub reply_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        ApiServerConfig {
            max_body_bytes: MAX_BODY_BYTES,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(30),
            max_connections: 32,
        }
    }
}

/// The running API server. Dropping it stops the thread and removes the socket.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    /// (device, inode) of the socket we bound, so Drop never removes someone else's.
    identity: (u64, u64),
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// What the handlers share.
struct Shared {
    tx: Sender<ApiRequest>,
    wake: EventFd,
    config: ApiServerConfig,
}

impl ApiServer {
    /// Binds the socket (refusing if a live process listens on it; removing a stale socket
    /// file), starts the `vmm_api` thread and returns at once. Requests go to `tx`, and
    /// `wake` is written after each so the event loop notices.
    pub fn start(
        path: &Path,
        tx: Sender<ApiRequest>,
        wake: EventFd,
    ) -> Result<ApiServer, ApiServerError> {
        ApiServer::start_with_config(path, tx, wake, ApiServerConfig::default())
    }

    /// [`ApiServer::start`] with other limits (tests use short deadlines).
    pub fn start_with_config(
        path: &Path,
        tx: Sender<ApiRequest>,
        wake: EventFd,
        config: ApiServerConfig,
    ) -> Result<ApiServer, ApiServerError> {
        ApiServer::start_inner(path, tx, wake, config, SeccompLevel::Off)
    }

    /// [`ApiServer::start`], the `vmm_api` thread installing the API seccomp filter at
    /// `level` before it serves. Its setup (the socket bound, the tokio runtime built) is
    /// done before, on the calling thread.
    pub fn start_filtered(
        path: &Path,
        tx: Sender<ApiRequest>,
        wake: EventFd,
        level: SeccompLevel,
    ) -> Result<ApiServer, ApiServerError> {
        ApiServer::start_inner(path, tx, wake, ApiServerConfig::default(), level)
    }

    fn start_inner(
        path: &Path,
        tx: Sender<ApiRequest>,
        wake: EventFd,
        config: ApiServerConfig,
        level: SeccompLevel,
    ) -> Result<ApiServer, ApiServerError> {
        let sock_err = |what: &'static str| {
            let path = path.to_path_buf();
            move |source| ApiServerError::Socket { what, path, source }
        };
        clear_stale_socket(path)?;
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(sock_err("bind"))?;
        // Only our own user may drive the VM. (The jailer also confines the directory.)
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(sock_err("set permissions on"))?;
        let meta = std::fs::metadata(path).map_err(sock_err("inspect"))?;
        let identity = (meta.dev(), meta.ino());
        let mut server = ApiServer {
            path: path.to_path_buf(),
            identity,
            stop: None,
            thread: None,
        };
        // From here on, an early return drops `server`, which removes the socket.
        listener
            .set_nonblocking(true)
            .map_err(sock_err("set non-blocking mode on"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(ApiServerError::Thread)?;
        let listener = {
            let _ctx = runtime.enter();
            tokio::net::UnixListener::from_std(listener).map_err(ApiServerError::Thread)?
        };
        let shared = Arc::new(Shared { tx, wake, config });
        let (stop_tx, stop_rx) = oneshot::channel();
        let (filtered_tx, filtered_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vmm_api".into())
            .spawn(move || {
                let filtered = seccomp::install(ThreadKind::Api, level, "vmm_api");
                let ok = filtered.is_ok();
                // The receiver waits for this answer, so the send cannot fail.
                let _ = filtered_tx.send(filtered);
                if ok {
                    runtime.block_on(serve(listener, shared, stop_rx));
                }
            })
            .map_err(ApiServerError::Thread)?;
        server.stop = Some(stop_tx);
        server.thread = Some(thread);
        match filtered_rx.recv() {
            Ok(Ok(())) => Ok(server),
            Ok(Err(e)) => Err(ApiServerError::Seccomp(e)),
            Err(_) => Err(ApiServerError::Thread(std::io::Error::other(
                "the API thread ended before serving",
            ))),
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // Err only if the thread has already ended; nothing more to stop then.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // The thread only ends its accept loop and drops the runtime, which cancels
            // in-flight requests; a panic there has already been reported.
            let _ = thread.join();
        }
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            // Best effort: a leftover socket is cleared by the next start anyway.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Makes `path` free to bind: nothing there, or a socket nobody listens on (left by a VMM
/// that died), which is removed. A live listener or a non-socket file is refused.
fn clear_stale_socket(path: &Path) -> Result<(), ApiServerError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiServerError::Socket {
                what: "inspect",
                path: path.into(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ApiServerError::NotASocket(path.into()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ApiServerError::InUse(path.into())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|source| ApiServerError::Socket {
                what: "remove stale",
                path: path.into(),
                source,
            }),
        Err(source) => Err(ApiServerError::Socket {
            what: "inspect",
            path: path.into(),
            source,
        }),
    }
}

/// The accept loop: one task per connection, at most `max_connections` at once, until
/// `stop` fires or its sender is dropped.
async fn serve(
    listener: tokio::net::UnixListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    let header_timeout = shared.config.header_timeout;
    let slots = Arc::new(Semaphore::new(shared.config.max_connections.max(1)));
    let router = Router::new()
        .fallback(handle)
        .layer(DefaultBodyLimit::max(shared.config.max_body_bytes))
        .with_state(shared);
    loop {
        let next = async {
            let slot = Arc::clone(&slots).acquire_owned().await;
            (slot, listener.accept().await)
        };
        let (slot, accepted) = tokio::select! {
            biased;
            _ = &mut stop => return,
            next = next => next,
        };
        // The semaphore is never closed, so acquiring cannot fail.
        let Ok(slot) = slot else { return };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of fds or memory: back off instead of spinning; clients wait in
                // the backlog meanwhile.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(MAX_BODY_BYTES)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            // A client that hangs up or times out ends its own connection; no one to tell.
            drop(conn);
        });
    }
}

/// Every request: read the body, parse, hand to the VMM, await its answer.
async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let body = match tokio::time::timeout(
        shared.config.body_timeout,
        Bytes::from_request(request, &()),
    )
    .await
    {
        Err(_) => {
            return fault(
                StatusCode::REQUEST_TIMEOUT,
                "timed out reading the request body",
            )
        }
        Ok(Err(rejection)) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return fault(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "request body is larger than {} bytes",
                    shared.config.max_body_bytes
                ),
            )
        }
        Ok(Err(rejection)) => return fault(rejection.status(), &rejection.body_text()),
        Ok(Ok(body)) => body,
    };
    let action = match parse_request(&method, &path, &body) {
        Ok(action) => action,
        Err(e) => {
            let mut response = error_response(&e);
            if e.status == 405 {
                if let Some(allow) =
                    allowed_methods(&path).and_then(|m| HeaderValue::from_str(&m.join(", ")).ok())
                {
                    response.headers_mut().insert(header::ALLOW, allow);
                }
            }
            return response;
        }
    };
    let (request, answer) = ApiRequest::new(action);
    if shared.tx.send(request).is_err() {
        return fault(
            StatusCode::SERVICE_UNAVAILABLE,
            "the VMM is not running (its request channel is closed)",
        );
    }
    // EAGAIN means the counter is full, i.e. a wake-up is already pending: fine.
    if let Err(e) = shared.wake.write(1) {
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return fault(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot wake the VMM: {e}"),
            );
        }
    }
    match tokio::time::timeout(shared.config.reply_timeout, answer).await {
        Err(_) => fault(
            StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "the VMM did not answer within {} s",
                shared.config.reply_timeout.as_secs_f32()
            ),
        ),
        Ok(Err(_)) => fault(
            StatusCode::SERVICE_UNAVAILABLE,
            "the VMM dropped the request without answering (is it shutting down?)",
        ),
        Ok(Ok(Ok(data))) => data_response(data),
        Ok(Ok(Err(e))) => error_response(&e),
    }
}

fn data_response(data: VmmData) -> Response {
    let body = match data {
        VmmData::Empty => return StatusCode::NO_CONTENT.into_response(),
        VmmData::InstanceInfo(i) => serde_json::to_string(&i),
        VmmData::MachineConfig(m) => serde_json::to_string(&m),
        VmmData::Json(v) => serde_json::to_string(&v),
        VmmData::VmConfig(c) => serde_json::to_string(&c),
    };
    match body {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(e) => fault(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode the answer: {e}"),
        ),
    }
}

/// The VMM's error as sent; a status that is not an error (a VMM bug) becomes 500.
fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, e.fault_json())
}

fn fault(status: StatusCode, message: &str) -> Response {
    json_response(status, ApiError::new(status.as_u16(), message).fault_json())
}

fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}
