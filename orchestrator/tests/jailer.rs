//! The `jailer` binary on this machine (root, /dev/kvm). A static busybox shell stands in
//! for `vmm` and reports from inside the jail what it sees and who it is. Two tests jail the
//! real `vmm`: one runs a tiny hand-made guest on the jail's /dev/kvm, one reaches its API
//! socket through the jail directory. Every test uses its own base directory under the temp
//! dir, and removes the cgroups it made.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PROBE: &str = r#"
echo --pid; echo $$
echo --id; /busybox id
echo --hostname; /busybox hostname
echo --ls; /busybox ls -1a /
echo --status; /busybox cat /proc/self/status
echo --limits; /busybox cat /proc/self/limits
echo --cgroup; /busybox cat /proc/self/cgroup
echo --fds; /busybox ls /proc/self/fd
echo --host
for p in /work /etc /etc/hostname /tmp /usr /bin/busybox /root; do
  test -e $p && echo "HOST-VISIBLE $p"
done
echo --env; /busybox env
echo --files
/busybox cat /data/ro.txt
echo written-in-jail >> /disk.img && echo rw-ok
echo nope >> /data/ro.txt || echo ro-refused
echo --end
echo READY
read line
echo after-read
"#;

/// The whole confinement, seen from inside: only the jail's files, the given uid/gid with
/// no capabilities, NoNewPrivs, PID 1 of its own namespace, the rlimits, no inherited fd or
/// environment, the files linked ro/rw, the device nodes, and the cgroup limits written.
#[test]
fn busybox_in_the_jail_sees_only_the_jail_as_unprivileged_pid_1() {
    let base = Base::new("probe");
    let id = "probe-1";
    let ro = base.file("ro.txt", "hello from the host\n");
    let disk = base.file("disk.img", "");
    let parent = format!("jailer-test-{}", std::process::id());
    let ro_arg = format!("{}:/data/ro.txt", ro.display());
    let disk_arg = format!("{}:rw", disk.display());
    let mut cmd = shell(
        &base,
        id,
        &[
            "--json",
            "--mount-proc",
            "--parent-cgroup",
            &parent,
            "--cgroup",
            "memory.max=268435456",
            "--cgroup",
            "pids.max=64",
            "--cgroup",
            "cpu.max=50000 100000",
            "--resource-limit",
            "no-file=128",
            "--resource-limit",
            "fsize=1048576",
            "--file",
            &ro_arg,
            "--file",
            &disk_arg,
        ],
        PROBE,
    );
    cmd.env("JAILER_TEST_SECRET", "leaked")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: runs in the forked child before exec; dup2 is async-signal-safe and leaves
    // fd 7 open across exec (no CLOEXEC), as a careless caller would.
    unsafe {
        cmd.pre_exec(|| {
            if libc::dup2(2, 7) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut cleanup = CgroupCleanup(Vec::new());
    let mut child = Running(cmd.spawn().unwrap());
    let stderr = drain(child.0.stderr.take().unwrap());
    let mut out = BufReader::new(child.0.stdout.take().unwrap());

    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let report: serde_json::Value = serde_json::from_str(&first)
        .unwrap_or_else(|e| panic!("first stdout line is not the JSON report ({e}): {first:?}"));
    let root = base.root("busybox", id);
    assert_eq!(report["jail_root"], root.to_str().unwrap());
    assert_eq!(report["exec"], "/busybox");
    let cgroups: Vec<PathBuf> = report["cgroups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| PathBuf::from(v.as_str().unwrap()))
        .collect();
    cleanup.0 = cgroups.iter().map(|c| c.parent().unwrap().into()).collect();
    assert!(!cgroups.is_empty());

    let lines = lines_until(&mut out, "READY");

    // The limits, read on the host while the jailed shell waits.
    let (mut mem, mut pids, mut cpu) = (None, None, None);
    for c in &cgroups {
        assert!(c.ends_with(format!("{parent}/{id}")), "{}", c.display());
        let procs = read_trim(&c.join("cgroup.procs"));
        assert!(!procs.is_empty(), "nothing in {}", c.display());
        for f in ["memory.limit_in_bytes", "memory.max"] {
            if c.join(f).exists() {
                mem = Some(read_trim(&c.join(f)));
            }
        }
        if c.join("pids.max").exists() {
            pids = Some(read_trim(&c.join("pids.max")));
        }
        if c.join("cpu.max").exists() {
            cpu = Some(read_trim(&c.join("cpu.max")));
        } else if c.join("cpu.cfs_quota_us").exists() {
            cpu = Some(format!(
                "{} {}",
                read_trim(&c.join("cpu.cfs_quota_us")),
                read_trim(&c.join("cpu.cfs_period_us"))
            ));
        }
    }
    assert_eq!(mem.as_deref(), Some("268435456"));
    assert_eq!(pids.as_deref(), Some("64"));
    assert_eq!(cpu.as_deref(), Some("50000 100000"));

    // Lets the shell blocked on `read` go on.
    let mut stdin = child.0.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let code = wait(&mut child.0);
    let stderr = stderr.recv().unwrap();
    let all = lines.join("\n");
    assert_eq!(code, Some(0), "{all}\n{rest}\nstderr:\n{stderr}");
    assert!(rest.contains("after-read"), "{rest}");

    assert_eq!(section(&lines, "pid"), ["1"], "{all}");
    assert_eq!(section(&lines, "id"), ["uid=12345 gid=23456"], "{all}");
    assert_eq!(section(&lines, "hostname"), [id], "{all}");
    let ls: BTreeSet<&str> = section(&lines, "ls").into_iter().collect();
    let want: BTreeSet<&str> = [".", "..", "busybox", "data", "dev", "disk.img", "proc"].into();
    assert_eq!(ls, want, "{all}");
    let status = section(&lines, "status");
    for want in [
        "NoNewPrivs:\t1",
        "Uid:\t12345\t12345\t12345\t12345",
        "Gid:\t23456\t23456\t23456\t23456",
        "Groups:\t",
        "CapEff:\t0000000000000000",
        "CapPrm:\t0000000000000000",
        "CapBnd:\t0000000000000000",
    ] {
        assert!(
            status.iter().any(|l| l.trim_end() == want.trim_end()),
            "no {want:?} in {status:#?}"
        );
    }
    let limits = section(&lines, "limits");
    let limit = |name: &str| -> Vec<&str> {
        let l = limits.iter().find(|l| l.starts_with(name)).unwrap();
        l[name.len()..].split_whitespace().take(2).collect()
    };
    assert_eq!(limit("Max open files"), ["128", "128"], "{limits:#?}");
    assert_eq!(
        limit("Max file size"),
        ["1048576", "1048576"],
        "{limits:#?}"
    );
    let own = section(&lines, "cgroup");
    assert!(
        own.iter().any(|l| l.ends_with(&format!("/{parent}/{id}"))),
        "{own:#?}"
    );
    let fds = section(&lines, "fds");
    assert!(
        !fds.contains(&"7"),
        "inherited fd 7 leaked into the jail: {fds:?}"
    );
    assert!(section(&lines, "host").is_empty(), "{all}");
    assert!(!all.contains("leaked"), "the environment leaked: {all}");
    assert_eq!(
        section(&lines, "files"),
        ["hello from the host", "rw-ok", "ro-refused"],
        "{all}\n{stderr}"
    );

    // Host side: the rw disk was written through the jail, the ro file was not.
    assert_eq!(fs::read_to_string(&disk).unwrap(), "written-in-jail\n");
    assert_eq!(fs::read_to_string(&ro).unwrap(), "hello from the host\n");
    // Device nodes with the host's numbers, owned by the VMM's ids; the binary is root's.
    for dev in ["dev/kvm", "dev/urandom"] {
        let host = fs::metadata(Path::new("/").join(dev)).unwrap();
        let jail = fs::metadata(root.join(dev)).unwrap();
        assert_eq!(jail.rdev(), host.rdev(), "{dev}");
        assert_eq!(
            (jail.uid(), jail.gid(), jail.mode() & 0o777),
            (UID, GID, 0o600),
            "{dev}"
        );
    }
    let exe = fs::metadata(root.join("busybox")).unwrap();
    assert_eq!((exe.uid(), exe.mode() & 0o7777), (0, 0o755));
    assert_eq!(fs::metadata(&root).unwrap().uid(), UID);
    // The foreground jailer removed its cgroups once the VMM was gone.
    for c in &cgroups {
        assert!(!c.exists(), "{} left behind", c.display());
    }
}

#[test]
fn the_vmm_exit_status_and_termination_signals_pass_through_the_jailer() {
    let base = Base::new("status");
    let d = run(&mut shell(&base, "exit-7", &[], "exit 7"));
    assert_eq!(d.code, Some(7), "{}", d.stderr);
    assert!(
        d.stderr.contains("jailer: exit-7 runs as pid"),
        "{}",
        d.stderr
    );
    assert!(d.stderr.contains("/api.sock on the host"), "{}", d.stderr);

    // PID 1 only gets signals it handles: the shell traps SIGTERM.
    let script =
        r#"trap "echo got-term; exit 42" TERM; echo READY; while :; do /busybox sleep 0.05; done"#;
    let mut child = Running(
        shell(&base, "term", &[], script)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let _stderr = drain(child.0.stderr.take().unwrap());
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    lines_until(&mut out, "READY");
    // SAFETY: kill with the pid of the jailer we spawned and have not reaped.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(wait(&mut child.0), Some(42), "{rest}");
    assert!(rest.contains("got-term"), "{rest}");
}

#[test]
fn a_daemonized_jail_keeps_running_after_the_jailer_exits() {
    let base = Base::new("daemon");
    let script = "echo $$ > /out; /busybox sleep 0.3; echo done >> /out";
    let d = run(&mut shell(&base, "d1", &["--daemonize", "--json"], script));
    assert_eq!(d.code, Some(0), "{}", d.stderr);
    let report: serde_json::Value = serde_json::from_str(d.stdout.trim()).unwrap();
    let pid = report["pid"].as_i64().unwrap();
    let pid_file = PathBuf::from(report["pid_file"].as_str().unwrap());
    assert_eq!(pid_file, base.0.join("busybox/d1/busybox.pid"));
    assert_eq!(read_trim(&pid_file), pid.to_string());
    let out = base.root("busybox", "d1").join("out");
    let start = Instant::now();
    while fs::read_to_string(&out).map_or(true, |s| !s.contains("done")) {
        assert!(
            start.elapsed() < TIMEOUT,
            "the daemonized jail never finished"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fs::read_to_string(&out).unwrap(), "1\ndone\n");
}

#[test]
fn a_dynamic_binary_runs_once_its_loader_and_libraries_are_in_the_jail() {
    let base = Base::new("dynamic");
    let interp = "/lib64/ld-linux-x86-64.so.2";
    let libc_so = "/lib/x86_64-linux-gnu/libc.so.6";
    let d = run(&mut jailer(&base, "/bin/true", "bare", &[], &[]));
    assert_eq!(d.code, Some(1), "{}", d.stderr);
    for n in ["dynamically linked", interp, "crt-static", "--file"] {
        assert!(d.stderr.contains(n), "no {n:?} in {}", d.stderr);
    }
    assert!(
        !base.root("true", "bare").exists(),
        "a failed jail was left behind"
    );

    let files = [format!("{interp}:{interp}"), format!("{libc_so}:{libc_so}")];
    let d = run(&mut jailer(
        &base,
        "/bin/true",
        "libs",
        &["--file", &files[0], "--file", &files[1]],
        &[],
    ));
    assert_eq!(d.code, Some(0), "{}", d.stderr);
}

/// The real `vmm`, jailed, waiting for its configuration on `--api-sock /api.sock`: the
/// host reaches the socket at `<base>/vmm/<id>/root/api.sock`, and SIGTERM to the jailer
/// stops it (status 128+15).
#[test]
fn the_jailed_vmm_serves_its_api_socket_under_the_jail_root() {
    let base = Base::new("vmm");
    let vmm = vmm_binary();
    let vmm = vmm.to_str().unwrap();
    let libs = library_files(vmm);
    let mut extra = vec!["--mount-proc"];
    for l in &libs {
        extra.extend(["--file", l.as_str()]);
    }
    let mut child = Running(
        jailer(&base, vmm, "api", &extra, &VMM_ARGS)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = drain(child.0.stderr.take().unwrap());
    let sock = base.root("vmm", "api").join("api.sock");
    let start = Instant::now();
    while !sock.exists() {
        if let Some(code) = child.0.try_wait().unwrap() {
            panic!(
                "vmm exited ({code}) without an API socket:\n{}",
                stderr.recv().unwrap()
            );
        }
        assert!(start.elapsed() < TIMEOUT, "no {}", sock.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    let md = fs::metadata(&sock).unwrap();
    assert_eq!((md.uid(), md.gid()), (UID, GID), "the socket is the VMM's");
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("Not started"), "{resp}");

    // SAFETY: kill with the pid of the jailer we spawned and have not reaped.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    assert_eq!(wait(&mut child.0), Some(128 + 15));
}

/// A running jailed VMM (default seccomp level) seen through /proc from the host, i.e. its
/// own view: every thread (main, vCPU, API) runs as the jail's uid with NoNewPrivs and a
/// seccomp filter, and its `/` holds the jail's entries and no host directory.
#[test]
fn a_running_jailed_vmm_is_unprivileged_filtered_and_sees_only_its_jail() {
    let base = Base::new("vmm-spin");
    let vmm = vmm_binary();
    let vmm = vmm.to_str().unwrap();
    let elf = base.0.join("spin.elf");
    fs::write(&elf, spinning_guest_elf()).unwrap();
    let kernel = format!("{}:/spin.elf", elf.display());
    let libs = library_files(vmm);
    let mut extra = vec!["--mount-proc", "--file", &kernel];
    for l in &libs {
        extra.extend(["--file", l.as_str()]);
    }
    let args = [
        "--kernel",
        "/spin.elf",
        "--memory-mib",
        "16",
        "--console",
        "none",
        "--api-sock",
        "/api.sock",
    ];
    let mut child = Running(
        jailer(&base, vmm, "spin", &extra, &args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = drain(child.0.stderr.take().unwrap());
    // Running: the API answers with the VM started.
    let sock = base.root("vmm", "spin").join("api.sock");
    let start = Instant::now();
    loop {
        if let Some(code) = child.0.try_wait().unwrap() {
            panic!("vmm exited ({code}):\n{}", stderr.recv().unwrap());
        }
        let state = UnixStream::connect(&sock).ok().and_then(|mut s| {
            s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .ok()?;
            let mut r = String::new();
            s.read_to_string(&mut r).ok()?;
            Some(r)
        });
        if state.is_some_and(|r| r.contains("Running")) {
            break;
        }
        assert!(start.elapsed() < TIMEOUT, "the VM never ran");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The VMM's own view, read through /proc from the host: every thread unprivileged,
    // NoNewPrivs, under seccomp filters; its / holds only the jail's entries.
    let pid = read_trim(&base.0.join("vmm/spin/vmm.pid"));
    let mut threads = Vec::new();
    for t in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let status = fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        };
        threads.push((
            field("Name:"),
            field("Uid:"),
            field("NoNewPrivs:"),
            field("Seccomp:"),
        ));
    }
    assert!(threads.len() >= 2, "{threads:?}");
    let uid = format!("{UID} {UID} {UID} {UID}");
    for (name, u, nnp, seccomp) in &threads {
        assert_eq!((u, nnp.as_str()), (&uid, "1"), "{name}: {threads:?}");
        assert_eq!(
            seccomp, "2",
            "thread {name} is not under a seccomp filter: {threads:?}"
        );
    }
    let root: BTreeSet<String> = fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for host_only in ["etc", "usr", "work", "root", "home", "boot"] {
        assert!(
            !root.contains(host_only),
            "/{host_only} visible in the jail: {root:?}"
        );
    }
    assert!(root.contains("vmm") && root.contains("dev"), "{root:?}");
    assert!(
        threads.iter().any(|t| t.0.contains("vcpu")),
        "no vCPU thread: {threads:?}"
    );
    // SAFETY: kill with the pid of the jailer we spawned and have not reaped.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    assert_eq!(wait(&mut child.0), Some(128 + 15));
}

/// The jailed VMM's arguments (paths inside the jail); its seccomp filters stay at the
/// default level, so jail and filters are tested together.
const VMM_ARGS: [&str; 4] = ["--api-sock", "/api.sock", "--console", "none"];

/// The real `vmm`, jailed under cgroup limits, runs a tiny guest on the jail's /dev/kvm
/// node to its end; the guest's exit status comes back through vmm and the jailer.
#[test]
fn the_jailed_vmm_runs_a_tiny_guest_on_the_jails_dev_kvm() {
    let base = Base::new("vmm-guest");
    let vmm = vmm_binary();
    let vmm = vmm.to_str().unwrap();
    let elf = base.0.join("tiny.elf");
    fs::write(&elf, tiny_guest_elf()).unwrap();
    let kernel = format!("{}:/boot/tiny.elf", elf.display());
    let parent = format!("jailer-test-{}-vmm", std::process::id());
    let libs = library_files(vmm);
    let mut extra = vec![
        "--json",
        "--file",
        &kernel,
        "--parent-cgroup",
        &parent,
        "--cgroup",
        "memory.max=268435456",
        "--cgroup",
        "pids.max=64",
    ];
    for l in &libs {
        extra.extend(["--file", l.as_str()]);
    }
    let args = [
        "--kernel",
        "/boot/tiny.elf",
        "--memory-mib",
        "16",
        "--console",
        "none",
        "--exit-with-guest-status",
    ];
    let d = run(&mut jailer(&base, vmm, "guest", &extra, &args));
    let (cgroups, _cleanup) = report_cgroups(&d);
    assert_eq!(d.code, Some(42), "{}", d.stderr);
    assert!(d.stderr.contains("guest exit status 42"), "{}", d.stderr);
    assert!(!cgroups.is_empty());
    for c in &cgroups {
        assert!(!c.exists(), "{} left behind", c.display());
    }
}

#[test]
fn root_ids_are_refused() {
    let base = Base::new("root-ids");
    for (flag, other) in [("--uid", "--gid"), ("--gid", "--uid")] {
        let d = run(Command::new(JAILER)
            .args([
                "--id",
                "r",
                "--exec-file",
                BUSYBOX,
                flag,
                "0",
                other,
                "1000",
            ])
            .arg("--chroot-base-dir")
            .arg(&base.0));
        assert_refused(&d, 2, &[flag, "0 is root", "unprivileged"]);
    }
    assert!(!base.0.join("busybox").exists(), "nothing may be built");
}

#[test]
fn a_non_empty_jail_root_is_refused() {
    let base = Base::new("non-empty");
    let root = base.root("busybox", "taken");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("leftover"), "x").unwrap();
    let d = run(&mut shell(&base, "taken", &[], "true"));
    assert_refused(&d, 1, &[root.to_str().unwrap(), "not empty", "--id"]);
    assert!(root.join("leftover").exists());
}

#[test]
fn a_missing_file_to_link_is_refused_before_building() {
    let base = Base::new("missing-file");
    let d = run(&mut shell(
        &base,
        "m",
        &["--file", "/nonexistent/vmlinux"],
        "true",
    ));
    assert_refused(&d, 1, &["/nonexistent/vmlinux", "No such file"]);
    assert!(!base.root("busybox", "m").exists());
    let d = run(&mut shell(&base, "m", &["--file", "/a:relative"], "true"));
    assert_refused(&d, 2, &["--file", "absolute"]);
}

#[test]
fn an_unsafe_chroot_base_is_refused() {
    let base = Base::new("unsafe-base");
    fs::set_permissions(&base.0, fs::Permissions::from_mode(0o777)).unwrap();
    let d = run(&mut shell(&base, "w", &[], "true"));
    assert_refused(&d, 1, &["bad chroot base", "world-writable"]);
    fs::set_permissions(&base.0, fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&base.0, Some(UID), None).unwrap();
    let d = run(&mut shell(&base, "w", &[], "true"));
    assert_refused(&d, 1, &["bad chroot base", "owned by uid 12345"]);
    assert!(!base.0.join("busybox").exists());
}

#[test]
fn an_unavailable_cgroup_controller_is_named() {
    let base = Base::new("cgroup");
    let d = run(&mut shell(
        &base,
        "c",
        &["--cgroup", "nosuchctl.max=1"],
        "true",
    ));
    assert_refused(&d, 1, &["cgroup controller `nosuchctl` is not available"]);
    assert!(!base.root("busybox", "c").exists());
    let d = run(&mut shell(&base, "c", &["--cgroup", "memory"], "true"));
    assert_refused(&d, 2, &["--cgroup", "memory.max=268435456"]);
}

#[test]
fn a_host_without_dev_kvm_is_refused() {
    let base = Base::new("no-kvm");
    // A private mount namespace with an empty /dev: the host keeps its own.
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs tmpfs /dev && exec "$@""#)
        .arg("sh")
        .arg(JAILER)
        .args([
            "--id",
            "k",
            "--exec-file",
            BUSYBOX,
            "--uid",
            "1000",
            "--gid",
            "1000",
        ])
        .arg("--chroot-base-dir")
        .arg(&base.0);
    let d = run(&mut c);
    assert_refused(&d, 1, &["/dev/kvm is not available", "kvm module"]);
}

#[test]
fn the_jailed_process_joins_the_given_network_namespace() {
    let base = Base::new("netns");
    // A network namespace held by a sleeping process, so nothing named is left on the host.
    let mut holder = Running(
        Command::new("unshare")
            .args(["--net", "sleep", "60"])
            .spawn()
            .unwrap(),
    );
    let ns = format!("/proc/{}/ns/net", holder.0.id());
    let host_ns = fs::read_link("/proc/self/ns/net").unwrap();
    let start = Instant::now();
    let want = loop {
        // `unshare` enters the namespace, then execs sleep in the same process.
        let l = fs::read_link(&ns).unwrap();
        if l != host_ns {
            break l;
        }
        assert!(
            holder.0.try_wait().unwrap().is_none(),
            "unshare --net failed"
        );
        assert!(start.elapsed() < TIMEOUT);
        std::thread::sleep(Duration::from_millis(10));
    };
    let script = "/busybox readlink /proc/self/ns/net; /busybox cat /proc/net/dev";
    let d = run(&mut shell(
        &base,
        "n",
        &["--mount-proc", "--netns", &ns],
        script,
    ));
    assert_eq!(d.code, Some(0), "{}", d.stderr);
    assert_eq!(d.stdout.lines().next(), want.to_str(), "{}", d.stdout);
    // A fresh namespace has only its loopback.
    let ifaces: Vec<&str> = d
        .stdout
        .lines()
        .skip(3)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, ["lo"], "{}", d.stdout);
}

#[test]
fn files_on_another_filesystem_are_bind_mounted_inside_the_jail_only() {
    let base = Base::new("bind");
    // /dev/shm is a tmpfs: a hard link from there into the base fails with EXDEV.
    let shm = TempDir(PathBuf::from(format!(
        "/dev/shm/jailer-test-{}",
        std::process::id()
    )));
    fs::create_dir_all(&shm.0).unwrap();
    let ro = shm.0.join("ro.txt");
    let rw = shm.0.join("rw.img");
    fs::write(&ro, "from shm\n").unwrap();
    // Writable by anyone: only the read-only mount stops the jailed write.
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o666)).unwrap();
    fs::write(&rw, "").unwrap();
    let script = "/busybox cat /ro.txt
echo x >> /ro.txt || echo ro-refused
echo in-jail >> /rw.img && echo rw-ok
/busybox grep -E ' /(ro.txt|rw.img) ' /proc/self/mountinfo";
    let files = [
        format!("{}", ro.display()),
        format!("{}:/rw.img:rw", rw.display()),
    ];
    let d = run(&mut shell(
        &base,
        "b",
        &["--mount-proc", "--file", &files[0], "--file", &files[1]],
        script,
    ));
    assert_eq!(d.code, Some(0), "{}", d.stderr);
    let lines: Vec<&str> = d.stdout.lines().collect();
    assert_eq!(
        lines[..3],
        ["from shm", "ro-refused", "rw-ok"],
        "{}",
        d.stdout
    );
    assert!(d.stderr.contains("Read-only file system"), "{}", d.stderr);
    assert!(d.stdout.contains(" /ro.txt ro,nosuid"), "{}", d.stdout);
    assert!(d.stdout.contains(" /rw.img rw,nosuid"), "{}", d.stdout);
    assert_eq!(fs::read_to_string(&ro).unwrap(), "from shm\n");
    assert_eq!(fs::read_to_string(&rw).unwrap(), "in-jail\n");
    assert_eq!(
        fs::metadata(&rw).unwrap().uid(),
        UID,
        "rw files go to the VMM's uid"
    );
    // The mounts lived and died with the jail's mount namespace.
    let host = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!host.contains(base.0.to_str().unwrap()), "{host}");
}

#[test]
fn a_netns_that_is_no_network_namespace_is_refused() {
    let base = Base::new("bad-netns");
    let d = run(&mut shell(
        &base,
        "n",
        &["--netns", "/etc/hostname"],
        "true",
    ));
    assert_refused(&d, 1, &["--netns /etc/hostname", "not a namespace file"]);
    let d = run(&mut shell(
        &base,
        "n",
        &["--netns", "/proc/self/ns/uts"],
        "true",
    ));
    assert_refused(&d, 1, &["--netns /proc/self/ns/uts", "not a network one"]);
    assert!(!base.0.join("busybox").exists());
}

/// A step that fails inside the jail (here setrlimit above fs.nr_open) is reported by the
/// jailer itself, even daemonized, and the jail and cgroups are removed.
#[test]
fn a_failure_inside_the_jail_is_reported_and_cleaned_up() {
    let base = Base::new("child-fail");
    let parent = format!("jailer-test-{}-fail", std::process::id());
    for daemonize in [false, true] {
        let mut extra = vec![
            "--parent-cgroup",
            &parent,
            "--cgroup",
            "pids.max=10",
            "--resource-limit",
            "no-file=999999999",
            "--json",
        ];
        if daemonize {
            extra.push("--daemonize");
        }
        let d = run(&mut shell(&base, "f", &extra, "echo ran"));
        let report: serde_json::Value = serde_json::from_str(d.stdout.trim()).unwrap();
        let cgroups: Vec<PathBuf> = report["cgroups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| PathBuf::from(v.as_str().unwrap()))
            .collect();
        let _cleanup = CgroupCleanup(cgroups.iter().map(|c| c.parent().unwrap().into()).collect());
        assert_refused(
            &d,
            1,
            &[
                "jailer: error: vm f: in the jail: setrlimit RLIMIT_NOFILE=999999999",
                "EPERM",
            ],
        );
        assert!(!d.stdout.contains("ran"));
        assert!(!d.stderr.contains("runs as pid"), "{}", d.stderr);
        let dir = base.0.join("busybox/f");
        assert!(
            !dir.exists(),
            "daemonize={daemonize}: {} left",
            dir.display()
        );
        assert!(!cgroups.is_empty());
        for c in &cgroups {
            assert!(!c.exists(), "{} left behind", c.display());
        }
    }
}

/// `--dir`: a host directory appears at DEST, writable only with `:rw`; what the jailed
/// process writes there is on the host at once; nested or clashing DESTs are refused.
#[test]
fn directories_are_bind_mounted_read_only_unless_rw() {
    let base = Base::new("dirs");
    let shared = TempDir(std::env::temp_dir().join(format!("jailer-dir-{}", std::process::id())));
    let ro = shared.0.join("ro");
    let rw = shared.0.join("rw");
    for d in [&ro, &rw] {
        fs::create_dir_all(d).unwrap();
        // World-writable: only the mount flags can stop the jailed write.
        fs::set_permissions(d, fs::Permissions::from_mode(0o777)).unwrap();
    }
    fs::write(ro.join("in.txt"), "host data\n").unwrap();
    let script = "/busybox cat /cfg/in.txt
echo x > /cfg/new || echo ro-refused
echo from-jail > /state/out.txt && echo rw-ok";
    let dirs = [
        format!("{}:/cfg", ro.display()),
        format!("{}:/state:rw", rw.display()),
    ];
    let d = run(&mut shell(
        &base,
        "d",
        &["--dir", &dirs[0], "--dir", &dirs[1]],
        script,
    ));
    assert_eq!(d.code, Some(0), "{}", d.stderr);
    assert_eq!(
        d.stdout.lines().collect::<Vec<_>>(),
        ["host data", "ro-refused", "rw-ok"],
        "{}",
        d.stderr
    );
    assert!(!ro.join("new").exists());
    assert_eq!(
        fs::read_to_string(rw.join("out.txt")).unwrap(),
        "from-jail\n"
    );

    let nested = format!("{}:/cfg/inner", rw.display());
    let d = run(&mut shell(
        &base,
        "nested",
        &["--dir", &dirs[0], "--dir", &nested],
        "true",
    ));
    assert_refused(&d, 1, &["/cfg/inner", "inside the other"]);
    let file = ro.join("in.txt");
    let d = run(&mut shell(
        &base,
        "notdir",
        &["--dir", file.to_str().unwrap()],
        "true",
    ));
    assert_refused(&d, 1, &["in.txt", "--dir needs a directory"]);
}

/// Killing a non-daemonized jailer (SIGKILL: nothing to forward) kills its VMM too.
#[test]
fn killing_the_jailer_kills_the_jailed_process() {
    let base = Base::new("pdeath");
    let mut child = Running(
        jailer(&base, BUSYBOX, "p", &["--json"], &["sleep", "600"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let _stderr = drain(child.0.stderr.take().unwrap());
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let report: serde_json::Value = serde_json::from_str(&first).unwrap();
    let pid = i32::try_from(report["pid"].as_i64().unwrap()).unwrap();
    // The jailed sleep is running (its exec is done once the jailer's message is out).
    let start = Instant::now();
    while !fs::read_link(format!("/proc/{pid}/exe"))
        .is_ok_and(|p| p.to_string_lossy().ends_with("busybox"))
    {
        assert!(start.elapsed() < TIMEOUT, "the jailed process never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let start = Instant::now();
    // Gone, or a zombie waiting for init to reap it.
    while fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    }) {
        assert!(start.elapsed() < TIMEOUT, "pid {pid} outlived its jailer");
        std::thread::sleep(Duration::from_millis(20));
    }
}
