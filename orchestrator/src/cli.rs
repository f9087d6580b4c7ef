//! The `orchestrator` command line: `serve` runs the daemon; every other subcommand is a
//! client of its control socket. Human tables by default; `--json` prints the API's JSON
//! (documented in the README as stable) for scripts.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::client::Client;
use crate::daemon::Config;
use crate::net_addr::Subnet;

const AFTER_HELP: &str = "\
The daemon (`orchestrator serve`, as root) keeps its state in SQLite under --state-dir and
serves REST + JSON on the control socket (mode 0660; root, the daemon's uid and
--socket-group may connect). Every other subcommand talks to that socket.

Typical use:
  orchestrator serve &
  orchestrator manifests add hello.json
  orchestrator vms create --manifest hello
  orchestrator vms exec vm-1a2b3c4d -- uname -a
  orchestrator vms destroy vm-1a2b3c4d

See `orchestrator <command> --help`, and the README for the manifest schema and the API.";

/// Runs one jailed vmm per workload: manifests, VMs, exec, logs, events.
#[derive(Debug, Parser)]
#[command(name = "orchestrator", version, after_long_help = AFTER_HELP)]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(
        long,
        global = true,
        default_value = "/run/orchestrator/orchestrator.sock"
    )]
    pub socket: PathBuf,
    /// Print JSON (the API's own answer) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the daemon (as root) until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// Workload manifests: add, list, show, remove.
    #[command(subcommand)]
    Manifests(ManifestCmd),
    /// VMs: create, list, show, exec, logs, stop, hibernate, wake, destroy.
    #[command(subcommand)]
    Vms(VmCmd),
    /// Lifecycle events (state changes, creates, destroys), oldest first.
    Events {
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: i64,
        /// Keep following new events (Server-Sent Events) until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
}

/// `serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Holds state.db, per-VM files and the jails. Must be root's, not world-writable.
    #[arg(long, default_value = "/var/lib/orchestrator")]
    pub state_dir: PathBuf,
    /// Group (number) that may use the control socket besides root.
    #[arg(long, value_name = "GID")]
    pub socket_group: Option<u32>,
    /// Also serve the API on this TCP address (needs --token-file).
    #[arg(long, value_name = "ADDR:PORT")]
    pub tcp: Option<std::net::SocketAddr>,
    /// File holding the bearer token TCP clients must send.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// VM subnet: the bridge takes its first host address, VMs lease the rest.
    #[arg(long, default_value = "172.30.0.0/24")]
    pub subnet: Subnet,
    /// Host bridge name.
    #[arg(long, default_value = "orch0")]
    pub bridge: String,
    /// The jailer binary [default: next to this binary].
    #[arg(long)]
    pub jailer: Option<PathBuf>,
    /// The vmm binary [default: next to this binary].
    #[arg(long)]
    pub vmm: Option<PathBuf>,
    /// VMMs run as uid/gid BASE + their address's host number.
    #[arg(long, default_value_t = 20000)]
    pub uid_base: u32,
    /// Seconds a new VM may take until its agent answers.
    #[arg(long, default_value_t = 120)]
    pub ready_timeout_s: u64,
}

/// `manifests` subcommands.
#[derive(Debug, Subcommand)]
pub enum ManifestCmd {
    /// Add a manifest from a JSON file ("-" for stdin).
    Add {
        /// The file.
        file: PathBuf,
    },
    /// List manifests.
    List,
    /// Show one manifest.
    Show {
        /// Its name.
        name: String,
    },
    /// Remove a manifest (refused while VMs use it).
    Remove {
        /// Its name.
        name: String,
    },
}

/// `vms` subcommands.
#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Create a VM from a manifest and wait until its workload runs.
    Create {
        /// The manifest's name.
        #[arg(long, short)]
        manifest: String,
        /// The VM id: 1 to 32 of a-z, 0-9, `-` [default: vm-<8 hex digits>].
        #[arg(long)]
        id: Option<String>,
        /// Forward host TCP port HOST to guest port GUEST (`HOST:GUEST`); a connection
        /// wakes the VM when it is hibernated.
        #[arg(long, value_name = "HOST:GUEST", value_parser = parse_forward)]
        port_forward: Option<(u16, u16)>,
    },
    /// List VMs.
    List,
    /// Show one VM.
    Show {
        /// VM id.
        id: String,
    },
    /// Run a command in a VM; prints its output as it comes and exits with its status.
    Exec {
        /// VM id.
        id: String,
        /// Environment entries.
        #[arg(long = "env", short, value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Working directory in the guest.
        #[arg(long)]
        cwd: Option<String>,
        /// Kill the command after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Console and workload output.
    Logs {
        /// VM id.
        id: String,
        /// Workload output from this byte offset on.
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Stop a VM's VMM (its lease, disk and network stay until destroy).
    Stop {
        /// VM id.
        id: String,
    },
    /// Hibernate a VM: snapshot it and stop its VMM (lease, disk and network stay); the next
    /// exec, logs or wake restores it.
    Hibernate {
        /// VM id.
        id: String,
    },
    /// Wake a hibernated VM (restore it from its snapshot).
    Wake {
        /// VM id.
        id: String,
    },
    /// Destroy a VM: VMM, network namespace, jail, disk copy and lease.
    Destroy {
        /// VM id.
        id: String,
    },
}

/// Runs the command line; returns the process exit status.
pub fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Cmd::Serve(a) => {
            serve(cli.socket, a)?;
            Ok(0)
        }
        Cmd::Manifests(m) => manifests(&Client::new(&cli.socket)?, cli.json, m),
        Cmd::Vms(v) => vms(&Client::new(&cli.socket)?, cli.json, v),
        Cmd::Events { since, follow } => {
            events(&Client::new(&cli.socket)?, cli.json, since, follow)
        }
    }
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn serve(socket: PathBuf, a: ServeArgs) -> Result<()> {
    let token = match &a.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("read --token-file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    if token.as_deref() == Some("") {
        anyhow::bail!("--token-file is empty");
    }
    crate::daemon::serve(Config {
        state_dir: a.state_dir,
        socket,
        socket_gid: a.socket_group,
        tcp: a.tcp,
        token,
        subnet: a.subnet,
        bridge: a.bridge,
        jailer: a.jailer.unwrap_or_else(|| sibling("jailer")),
        vmm: a.vmm.unwrap_or_else(|| sibling("vmm")),
        uid_base: a.uid_base,
        ready_timeout: Duration::from_secs(a.ready_timeout_s),
    })
}

const QUICK: Duration = Duration::from_secs(30);

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints rows as aligned columns under a header.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.len());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn manifests(c: &Client, as_json: bool, cmd: ManifestCmd) -> Result<i32> {
    match cmd {
        ManifestCmd::Add { file } => {
            let body = if file.as_os_str() == "-" {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut b).context("read stdin")?;
                b
            } else {
                std::fs::read(&file).with_context(|| format!("read {}", file.display()))?
            };
            // Refused here rather than by the daemon, which would close the connection
            // while we still write.
            if body.len() > crate::manifest::MAX_MANIFEST_BYTES {
                anyhow::bail!(
                    "manifest {} is {} bytes, more than the {} allowed",
                    file.display(),
                    body.len(),
                    crate::manifest::MAX_MANIFEST_BYTES
                );
            }
            let v = c
                .request("POST", "/v1/manifests", Some(&body), QUICK)?
                .ok()
                .with_context(|| format!("manifest {}", file.display()))?;
            if as_json {
                print_json(&v);
            } else {
                println!("added manifest {} ({})", s(&v["name"]), s(&v["hash"]));
            }
        }
        ManifestCmd::List => {
            let v = c.request("GET", "/v1/manifests", None, QUICK)?.ok()?;
            if as_json {
                print_json(&v);
            } else {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|m| {
                        vec![
                            s(&m["name"]),
                            s(&m["manifest"]["vcpus"]),
                            s(&m["manifest"]["memory_mib"]),
                            s(&m["manifest"]["entrypoint"]),
                            s(&m["hash"]).chars().take(12).collect(),
                        ]
                    })
                    .collect();
                table(
                    &["NAME", "VCPUS", "MEMORY_MIB", "ENTRYPOINT", "HASH"],
                    &rows,
                );
            }
        }
        ManifestCmd::Show { name } => {
            let v = c
                .request("GET", &format!("/v1/manifests/{name}"), None, QUICK)?
                .ok()?;
            print_json(if as_json { &v } else { &v["manifest"] });
        }
        ManifestCmd::Remove { name } => {
            c.request("DELETE", &format!("/v1/manifests/{name}"), None, QUICK)?
                .ok()?;
            if as_json {
                print_json(&json!({"removed": name}));
            } else {
                println!("removed manifest {name}");
            }
        }
    }
    Ok(0)
}

fn vm_row(v: &Value) -> Vec<String> {
    vec![
        s(&v["id"]),
        s(&v["state"]),
        s(&v["manifest"]),
        s(&v["ip"]),
        s(&v["mac"]),
        s(&v["pid"]),
    ]
}

const VM_HEADER: [&str; 6] = ["ID", "STATE", "MANIFEST", "IP", "MAC", "PID"];

/// One VM: its table row, or the API's JSON.
fn print_vm(v: &Value, as_json: bool) {
    if as_json {
        print_json(v);
    } else {
        table(&VM_HEADER, &[vm_row(v)]);
    }
}

/// Runs `f`, showing `what... N s` on stderr (when `show`) until it returns.
fn with_progress<T>(show: bool, what: &str, f: impl FnOnce() -> T) -> T {
    if !show {
        return f();
    }
    let started = Instant::now();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let done = done.clone();
        let what = what.to_string();
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                eprint!("\r{what}... {:.0} s", started.elapsed().as_secs_f64());
                let _ = std::io::stderr().flush();
                std::thread::sleep(Duration::from_millis(500));
            }
            eprintln!();
        })
    };
    let out = f();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = ticker.join();
    out
}

/// Runs a command through the streaming exec API (NDJSON lines). With `echo`, its output
/// goes to our stdout and stderr as it arrives; without, it is collected. Returns what the
/// collecting API would have answered, `{"stdout", "stderr", "code", "signal",
/// "timed_out"}` (with `echo`, `stdout` and `stderr` are empty: they were printed).
fn exec_stream(c: &Client, id: &str, body: &Value, timeout_s: u64, echo: bool) -> Result<Value> {
    let mut lines = crate::client::LineSplitter::default();
    let (mut stdout, mut stderr) = (String::new(), String::new());
    let mut exit: Option<Value> = None;
    let mut failed: Option<String> = None;
    // The start of the body, for an answer that is not a stream (an error).
    let mut head: Vec<u8> = Vec::new();
    let status = c.request_streaming(
        "POST",
        &format!("/v1/vms/{id}/exec?stream=true"),
        Some(body.to_string().as_bytes()),
        Duration::from_secs(timeout_s + 60),
        |chunk| {
            let room = (64 * 1024usize).saturating_sub(head.len());
            head.extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or_default());
            lines.push(chunk, |line| {
                let Ok(v) = serde_json::from_slice::<Value>(line) else {
                    return;
                };
                if let Some(t) = v["stdout"].as_str() {
                    if echo {
                        let mut o = std::io::stdout().lock();
                        let _ = o.write_all(t.as_bytes());
                        let _ = o.flush();
                    } else {
                        stdout.push_str(t);
                    }
                } else if let Some(t) = v["stderr"].as_str() {
                    if echo {
                        let mut e = std::io::stderr().lock();
                        let _ = e.write_all(t.as_bytes());
                        let _ = e.flush();
                    } else {
                        stderr.push_str(t);
                    }
                } else if v["exit"].is_object() {
                    exit = Some(v["exit"].clone());
                } else if let Some(m) = v["error"].as_str() {
                    failed = Some(m.to_string());
                }
            });
            true
        },
    )?;
    if status != 200 {
        crate::client::Answer {
            status,
            body: String::from_utf8_lossy(&head).into_owned(),
        }
        .ok()?;
        anyhow::bail!("exec in {id}: unexpected status {status}");
    }
    if let Some(m) = failed {
        anyhow::bail!("exec in {id} failed: {m}");
    }
    if exit.is_none() {
        // A daemon without streaming answers the collected JSON object instead.
        if let Ok(v) = serde_json::from_slice::<Value>(&head) {
            if v.get("timed_out").is_some() && v.get("stdout").is_some() {
                if echo {
                    print!("{}", v["stdout"].as_str().unwrap_or(""));
                    eprint!("{}", v["stderr"].as_str().unwrap_or(""));
                }
                return Ok(v);
            }
        }
    }
    let exit =
        exit.with_context(|| format!("exec in {id}: the stream ended before the exit status"))?;
    Ok(json!({
        "stdout": stdout,
        "stderr": stderr,
        "code": exit["code"],
        "signal": exit["signal"],
        "timed_out": exit["timed_out"].as_bool().unwrap_or(false),
    }))
}

fn vms(c: &Client, as_json: bool, cmd: VmCmd) -> Result<i32> {
    match cmd {
        VmCmd::Create {
            manifest,
            id,
            port_forward,
        } => {
            let mut body = json!({"manifest": manifest, "id": id});
            if let Some((host_port, guest_port)) = port_forward {
                body["port_forward"] = json!({"host_port": host_port, "guest_port": guest_port});
            }
            let started = Instant::now();
            // The answer comes once the workload runs.
            let ans = with_progress(
                !as_json,
                &format!("creating VM from manifest {manifest}"),
                || {
                    c.request(
                        "POST",
                        "/v1/vms",
                        Some(body.to_string().as_bytes()),
                        Duration::from_secs(600),
                    )
                },
            );
            let v = ans?.ok()?;
            if as_json {
                print_json(&v);
            } else {
                println!(
                    "VM {} running at {} ({:.1} s)",
                    s(&v["id"]),
                    s(&v["ip"]),
                    started.elapsed().as_secs_f64()
                );
            }
        }
        VmCmd::List => {
            let v = c.request("GET", "/v1/vms", None, QUICK)?.ok()?;
            if as_json {
                print_json(&v);
            } else {
                let rows: Vec<Vec<String>> =
                    v.as_array().into_iter().flatten().map(vm_row).collect();
                table(&VM_HEADER, &rows);
            }
        }
        VmCmd::Show { id } => {
            let v = c
                .request("GET", &format!("/v1/vms/{id}"), None, QUICK)?
                .ok()?;
            if as_json {
                print_json(&v);
            } else {
                table(&VM_HEADER, &[vm_row(&v)]);
                if let Some(t) = v["last_console"].as_str().filter(|t| !t.is_empty()) {
                    println!("--- last console output:\n{t}");
                }
            }
        }
        VmCmd::Exec {
            id,
            env,
            cwd,
            timeout_s,
            argv,
        } => {
            let mut envmap = serde_json::Map::new();
            for e in env {
                let (k, v) = e
                    .split_once('=')
                    .with_context(|| format!("--env {e:?}: expected KEY=VALUE"))?;
                envmap.insert(k.to_string(), Value::String(v.to_string()));
            }
            let body =
                json!({"argv": argv, "env": envmap, "cwd": cwd, "timeout_ms": timeout_s * 1000});
            let v = exec_stream(c, &id, &body, timeout_s, !as_json)?;
            if as_json {
                print_json(&v);
                return Ok(0);
            }
            if v["timed_out"].as_bool() == Some(true) {
                eprintln!("orchestrator: the command timed out after {timeout_s} s");
                return Ok(124);
            }
            if let Some(sig) = v["signal"].as_i64() {
                return Ok(128 + i32::try_from(sig).unwrap_or(0));
            }
            return Ok(v["code"]
                .as_i64()
                .and_then(|c| i32::try_from(c).ok())
                .unwrap_or(1));
        }
        VmCmd::Logs { id, offset } => {
            let v = c
                .request(
                    "GET",
                    &format!("/v1/vms/{id}/logs?offset={offset}"),
                    None,
                    QUICK,
                )?
                .ok()?;
            if as_json {
                print_json(&v);
            } else {
                println!("--- console:\n{}", v["console"].as_str().unwrap_or(""));
                if let Some(w) = v["workload"].as_str() {
                    println!(
                        "--- workload output (bytes {}..{}):\n{w}",
                        s(&v["workload_start"]),
                        s(&v["workload_end"])
                    );
                }
            }
        }
        VmCmd::Stop { id } => {
            let v = c
                .request("POST", &format!("/v1/vms/{id}/stop"), None, QUICK)?
                .ok()?;
            if as_json {
                print_json(&v);
            } else {
                println!("VM {id} stopped");
            }
        }
        VmCmd::Hibernate { id } => {
            let ans = with_progress(!as_json, &format!("hibernating {id}"), || {
                c.request(
                    "POST",
                    &format!("/v1/vms/{id}/hibernate"),
                    None,
                    Duration::from_secs(600),
                )
            });
            print_vm(&ans?.ok()?, as_json);
        }
        VmCmd::Wake { id } => {
            let ans = with_progress(!as_json, &format!("waking {id}"), || {
                c.request(
                    "POST",
                    &format!("/v1/vms/{id}/wake"),
                    None,
                    Duration::from_secs(600),
                )
            });
            print_vm(&ans?.ok()?, as_json);
        }
        VmCmd::Destroy { id } => {
            c.request(
                "DELETE",
                &format!("/v1/vms/{id}"),
                None,
                Duration::from_secs(120),
            )?
            .ok()?;
            if as_json {
                print_json(&json!({"destroyed": id}));
            } else {
                println!("VM {id} destroyed");
            }
        }
    }
    Ok(0)
}

fn events(c: &Client, as_json: bool, since: i64, follow: bool) -> Result<i32> {
    let print = |e: &Value| {
        if as_json {
            println!("{e}");
        } else {
            println!(
                "{:>6}  {}  {:<12}  {:<16}  {}",
                s(&e["seq"]),
                s(&e["time_ms"]),
                s(&e["vm_id"]),
                s(&e["kind"]),
                e["detail"]
            );
        }
    };
    if !follow {
        let v = c
            .request("GET", &format!("/v1/events?since={since}"), None, QUICK)?
            .ok()?;
        for e in v.as_array().into_iter().flatten() {
            print(e);
        }
        return Ok(0);
    }
    let mut pending = String::new();
    let status = c.request_streaming(
        "GET",
        &format!("/v1/events?since={since}&follow=true"),
        None,
        Duration::from_secs(u64::from(u32::MAX)),
        |chunk| {
            pending.push_str(&String::from_utf8_lossy(chunk));
            while let Some(i) = pending.find("\n\n") {
                let block: String = pending.drain(..i + 2).collect();
                for l in block.lines() {
                    if let Some(data) = l.strip_prefix("data: ") {
                        if let Ok(e) = serde_json::from_str::<Value>(data) {
                            print(&e);
                        }
                    }
                }
            }
            let _ = std::io::stdout().flush();
            true
        },
    )?;
    if status != 200 {
        anyhow::bail!("events: status {status}");
    }
    Ok(0)
}

/// `HOST:GUEST` ports of `vms create --port-forward`.
fn parse_forward(s: &str) -> Result<(u16, u16), String> {
    let (h, g) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected HOST:GUEST, e.g. 8080:80"))?;
    let port = |p: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{p:?} is not a port (1-65535)")),
        Ok(n) => Ok(n),
    };
    Ok((port(h)?, port(g)?))
}

#[cfg(test)]
mod forward_tests {
    use super::parse_forward;

    #[test]
    fn port_forward_flags_parse_or_say_why_not() {
        assert_eq!(parse_forward("8080:80"), Ok((8080, 80)));
        assert!(parse_forward("8080").unwrap_err().contains("HOST:GUEST"));
        assert!(parse_forward("0:80").unwrap_err().contains("not a port"));
        assert!(parse_forward("8080:70000")
            .unwrap_err()
            .contains("not a port"));
    }
}
