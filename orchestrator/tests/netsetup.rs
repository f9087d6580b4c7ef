//! Host test of `orchestrator::netsetup`: a real bridge, namespaces, veths, taps and
//! nftables rules, with names and a subnet private to this test run. Needs root.
//!
//! The guest is simulated: inside VM A's namespace the tap is swapped for a veth named
//! `tap0` whose peer sits in a "guest" namespace holding 10.200.0.2, so the DNAT/SNAT and
//! allow-list rules see exactly the interface names they were written for.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Output};

use orchestrator::net_addr::Mac;
use orchestrator::netsetup::{self, HostNet, VmNet};

const TAP_UID: u32 = 12345;

fn sh(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} {args:?}: {e}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = sh(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A ping command that exists here: iputils if installed, else busybox.
fn ping_cmd() -> Vec<&'static str> {
    let has_ping = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|p| {
            let bin = p.join("ping");
            // busybox's ping applet behind a symlink is fine too.
            bin.exists()
        })
    });
    if has_ping {
        vec!["ping"]
    } else {
        assert!(
            Path::new("/bin/busybox").exists(),
            "neither ping nor /bin/busybox is installed"
        );
        vec!["/bin/busybox", "ping"]
    }
}

/// Whether one ping from namespace `ns` (None: the host) to `ip` is answered.
fn pings(ns: Option<&str>, ip: Ipv4Addr) -> bool {
    let ip = ip.to_string();
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = ns {
        args.extend(["netns", "exec", ns]);
    }
    args.extend(ping_cmd());
    args.extend(["-c", "1", "-W", "2", &ip]);
    let (program, rest) = match ns {
        Some(_) => ("ip", &args[..]),
        None => (args[0], &args[1..]),
    };
    sh(program, rest).status.success()
}

/// Removes everything the test may have made, whatever happened.
struct Cleanup {
    host: HostNet,
    vm_ids: Vec<String>,
    extra_netns: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for id in &self.vm_ids {
            if let Err(e) = netsetup::destroy_vm_net(id) {
                eprintln!("cleanup: destroy {id}: {e}");
            }
        }
        for ns in &self.extra_netns {
            if Path::new("/run/netns").join(ns).exists() {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
        if let Err(e) = netsetup::teardown_host(&self.host) {
            eprintln!("cleanup: teardown host: {e}");
        }
    }
}

fn netns_list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn vm(id: &str, allow: &[&str]) -> VmNet {
    VmNet {
        vm_id: id.into(),
        leased_ip: Ipv4Addr::new(172, 30, 0, 7),
        egress_allow: allow.iter().map(|c| c.parse().unwrap()).collect(),
        mac: Mac::for_vm(id),
        tap_owner: 1000,
    }
}

/// Pure parts, no root needed.
#[test]
fn names_and_validation() {
    for good in ["a", "vm-1", "0123456789abcdef0123456789abcdef"] {
        netsetup::validate_vm_id(good).unwrap();
    }
    let too_long = "0123456789abcdef0123456789abcdef0";
    for bad in ["", "VM", "a_b", "a/b", "../x", "a.b", "é", too_long] {
        assert!(netsetup::validate_vm_id(bad).is_err(), "{bad:?}");
        assert!(netsetup::netns_name(bad).is_err());
        assert!(netsetup::host_veth_name(bad).is_err());
        assert!(netsetup::destroy_vm_net(bad).is_err());
    }
    assert_eq!(netsetup::netns_name("vm-1").unwrap(), "orch-vm-1");
    assert_eq!(
        netsetup::netns_path("vm-1").unwrap(),
        Path::new("/run/netns/orch-vm-1")
    );
    let ov = netsetup::host_veth_name("vm-1").unwrap();
    assert_eq!(ov.len(), 10);
    assert!(ov.starts_with("ov") && ov[2..].bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(ov, netsetup::host_veth_name("vm-1").unwrap());
    assert_ne!(ov, netsetup::host_veth_name("vm-2").unwrap());

    // The kernel's ip=<client>:<server>:<gw>:<netmask>:<host>:<dev>:<autoconf>.
    assert_eq!(
        netsetup::guest_kernel_ip_param(),
        "ip=10.200.0.2::10.200.0.1:255.255.255.252::eth0:off"
    );

    let host = HostNet::default();
    let mut v = vm("Bad", &[]);
    assert!(matches!(
        netsetup::create_vm_net(&host, &v),
        Err(netsetup::NetSetupError::InvalidVmId { .. })
    ));
    v.vm_id = "ok".into();
    v.leased_ip = Ipv4Addr::new(172, 30, 0, 1);
    assert!(matches!(
        netsetup::create_vm_net(&host, &v),
        Err(netsetup::NetSetupError::NotLeasable { .. })
    ));
    assert!(matches!(
        netsetup::remove_orphan("eth0"),
        Err(netsetup::NetSetupError::NotOurs(_))
    ));
}

#[test]
fn rulesets() {
    let r = netsetup::host_ruleset(&HostNet::default());
    assert!(r.starts_with("table inet orchestrator\ndelete table inet orchestrator\n"));
    assert!(r.contains("ip saddr 172.30.0.0/24 oifname != \"orch0\" masquerade"));
    assert!(r.contains("iifname \"orch0\" oifname \"orch0\" drop"));
    let open = netsetup::host_ruleset(&HostNet {
        isolate_vms: false,
        ..HostNet::default()
    });
    assert!(open.contains("iifname \"orch0\" oifname \"orch0\" accept"));

    let host = HostNet::default();
    let r = netsetup::vm_ruleset(&host, &vm("a", &[]));
    assert!(r.contains("ip daddr 172.30.0.7 dnat to 10.200.0.2"));
    assert!(r.contains("ip saddr 10.200.0.2 snat to 172.30.0.7"));
    assert!(r.contains("ip daddr 172.30.0.1 accept"));
    let accepts = r
        .lines()
        .filter(|l| l.contains(" accept") && !l.contains("policy"))
        .count();
    assert_eq!(accepts, 3, "only replies, inbound, gateway:\n{r}");
    let r = netsetup::vm_ruleset(&host, &vm("a", &["192.0.2.0/24", "0.0.0.0/0"]));
    assert!(r.contains("ip saddr 10.200.0.2 ip daddr 192.0.2.0/24 accept"));
    assert!(r.contains("ip saddr 10.200.0.2 accept comment \"egress: all\""));
}

#[test]
fn host_networking_end_to_end() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "tests/netsetup.rs creates bridges, namespaces and nftables rules: run it as root"
    );

    let pid = std::process::id();
    let n = pid % 250 + 1;
    let host = HostNet {
        bridge: format!("orcht{}", pid % 1000),
        subnet: format!("172.31.{n}.0/24").parse().unwrap(),
        nft_table: format!("orchestrator_t{pid}"),
        isolate_vms: true,
    };
    let id_a = format!("t{pid}-a");
    let id_b = format!("t{pid}-b");
    let id_leak = format!("t{pid}-leak");
    let guest_ns = format!("orcht{pid}-guest");
    let _cleanup = Cleanup {
        host: host.clone(),
        vm_ids: vec![id_a.clone(), id_b.clone(), id_leak.clone()],
        extra_netns: vec![guest_ns.clone()],
    };
    // Leftovers of an earlier run with the same pid would make the creates fail.
    for id in [&id_a, &id_b, &id_leak] {
        netsetup::destroy_vm_net(id).unwrap();
    }

    // Host side, twice: the second call must not fail or add anything.
    netsetup::ensure_host(&host).unwrap();
    let table = || ok("nft", &["list", "table", "inet", &host.nft_table]);
    let first = table();
    netsetup::ensure_host(&host).unwrap();
    assert_eq!(first, table(), "ensure_host is idempotent");
    assert!(first.contains("masquerade"), "{first}");
    let gw = host.subnet.gateway();
    let addrs = ok("ip", &["-o", "addr", "show", "dev", &host.bridge]);
    assert!(addrs.contains(&format!("{gw}/24")), "{addrs}");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap()
            .trim(),
        "1"
    );

    // An address on the host (on the bridge) that A's allow-list admits, one it does not.
    let allowed = Ipv4Addr::new(198, 18, u8::try_from(n).unwrap(), 1);
    let denied = Ipv4Addr::new(198, 19, u8::try_from(n).unwrap(), 1);
    for ip in [allowed, denied] {
        ok(
            "ip",
            &["addr", "add", &format!("{ip}/32"), "dev", &host.bridge],
        );
    }

    let leased = |last| Ipv4Addr::new(172, 31, u8::try_from(n).unwrap(), last);
    let vm_a = VmNet {
        vm_id: id_a.clone(),
        leased_ip: leased(2),
        egress_allow: vec![format!("198.18.{n}.0/24").parse().unwrap()],
        mac: Mac::for_vm(&id_a),
        tap_owner: TAP_UID,
    };
    let vm_b = VmNet {
        vm_id: id_b.clone(),
        leased_ip: leased(3),
        egress_allow: vec![],
        mac: Mac::for_vm(&id_b),
        tap_owner: TAP_UID,
    };
    let start = std::time::Instant::now();
    let a = netsetup::create_vm_net(&host, &vm_a).unwrap();
    eprintln!("create_vm_net took {:?}", start.elapsed());
    let b = netsetup::create_vm_net(&host, &vm_b).unwrap();
    assert_eq!(a.netns, format!("orch-{id_a}"));
    assert!(a.netns_path.exists());
    assert!(link_exists(&a.host_veth) && link_exists(&b.host_veth));
    // A second create of the same VM is refused and leaves the first intact.
    assert!(matches!(
        netsetup::create_vm_net(&host, &vm_a),
        Err(netsetup::NetSetupError::AlreadyExists(_))
    ));
    assert!(a.netns_path.exists() && link_exists(&a.host_veth));

    // The namespace reaches its gateway over the bridge.
    assert!(pings(Some(&a.netns), gw), "netns A cannot ping the gateway");
    assert!(pings(Some(&b.netns), gw), "netns B cannot ping the gateway");

    // The tap exists inside, owned by the VMM's uid, with the fixed guest-side address.
    let owner = ok(
        "ip",
        &[
            "netns",
            "exec",
            &a.netns,
            "cat",
            "/sys/class/net/tap0/owner",
        ],
    );
    assert_eq!(owner.trim(), TAP_UID.to_string());
    let tap = ok("ip", &["-n", &a.netns, "-o", "addr", "show", "dev", "tap0"]);
    assert!(tap.contains("10.200.0.1/30"), "{tap}");
    let eth0 = ok("ip", &["-n", &a.netns, "link", "show", "dev", "eth0"]);
    assert!(eth0.contains(&vm_a.mac.to_string()), "{eth0}");

    // NAT rules inside the namespace.
    let rules = ok("ip", &["netns", "exec", &a.netns, "nft", "list", "ruleset"]);
    assert!(
        rules.contains(&format!("dnat to {}", netsetup::GUEST_IP)),
        "{rules}"
    );
    assert!(rules.contains(&format!("snat to {}", leased(2))), "{rules}");

    // Host veths are isolated bridge ports.
    let ports = ok("bridge", &["-d", "link", "show"]);
    for veth in [&a.host_veth, &b.host_veth] {
        let line = ports
            .lines()
            .skip_while(|l| !l.contains(veth.as_str()))
            .take(4)
            .collect::<Vec<_>>()
            .join(" ");
        assert!(line.contains("isolated on"), "{veth} not isolated: {line}");
        assert!(line.contains(&format!("master {}", host.bridge)), "{line}");
    }

    // VM isolation: B's namespace cannot reach A's, neither on the link (isolated ports)
    // nor routed through the gateway (host forward chain).
    assert!(!pings(Some(&b.netns), leased(2)), "B reached A over L2");
    ok(
        "ip",
        &[
            "-n",
            &b.netns,
            "route",
            "add",
            &format!("{}/32", leased(2)),
            "via",
            &gw.to_string(),
        ],
    );
    assert!(
        !pings(Some(&b.netns), leased(2)),
        "B reached A via the host"
    );

    // Simulated guest behind A: replace the tap by a veth of the same name.
    ok("ip", &["-n", &a.netns, "link", "del", "tap0"]);
    ok("ip", &["netns", "add", &guest_ns]);
    ok(
        "ip",
        &[
            "-n", &a.netns, "link", "add", "tap0", "type", "veth", "peer", "name", "eth0", "netns",
            &guest_ns,
        ],
    );
    ok(
        "ip",
        &[
            "-n",
            &a.netns,
            "addr",
            "add",
            "10.200.0.1/30",
            "dev",
            "tap0",
        ],
    );
    ok("ip", &["-n", &a.netns, "link", "set", "tap0", "up"]);
    for args in [
        &["addr", "add", "10.200.0.2/30", "dev", "eth0"][..],
        &["link", "set", "eth0", "up"],
        &["link", "set", "lo", "up"],
        &["route", "add", "default", "via", "10.200.0.1"],
    ] {
        let mut full = vec!["-n", guest_ns.as_str()];
        full.extend_from_slice(args);
        ok("ip", &full);
    }
    // Guest → gateway (always allowed, SNAT'd to the leased address or the reply is lost).
    assert!(pings(Some(&guest_ns), gw), "guest cannot reach the gateway");
    // Allow-list: in → reachable, out → dropped.
    assert!(
        pings(Some(&guest_ns), allowed),
        "guest cannot reach {allowed}"
    );
    assert!(!pings(Some(&guest_ns), denied), "guest reached {denied}");
    // Another VM is not in the allow-list.
    assert!(!pings(Some(&guest_ns), leased(3)), "guest reached VM B");
    // Host → leased address of A is DNAT'd to the guest.
    assert!(
        pings(None, leased(2)),
        "host cannot reach the guest via DNAT"
    );
    ok("ip", &["netns", "del", &guest_ns]);

    // Orphans: a deliberately leaked VM namespace shows up; known VMs do not.
    let leak = netsetup::create_vm_net(
        &host,
        &VmNet {
            vm_id: id_leak.clone(),
            leased_ip: leased(4),
            egress_allow: vec![],
            mac: Mac::for_vm(&id_leak),
            tap_owner: TAP_UID,
        },
    )
    .unwrap();
    let known = [id_a.as_str(), id_b.as_str()];
    let orphans = netsetup::list_orphans(&known).unwrap();
    assert!(orphans.contains(&leak.netns), "{orphans:?}");
    assert!(orphans.contains(&leak.host_veth), "{orphans:?}");
    for h in [&a, &b] {
        assert!(!orphans.contains(&h.netns) && !orphans.contains(&h.host_veth));
    }
    assert!(netsetup::remove_orphan(&leak.netns).unwrap());
    assert!(!leak.netns_path.exists() && !link_exists(&leak.host_veth));
    let orphans = netsetup::list_orphans(&known).unwrap();
    assert!(!orphans.contains(&leak.netns) && !orphans.contains(&leak.host_veth));

    // Destroy both; a second destroy finds nothing.
    for h in [&a, &b] {
        let r = netsetup::destroy_vm_net(&h.vm_id).unwrap();
        assert!(r.netns && r.host_veth, "{r:?}");
        let again = netsetup::destroy_vm_net(&h.vm_id).unwrap();
        assert!(!again.netns && !again.host_veth, "{again:?}");
    }
    let namespaces = netns_list();
    let veths = ok("ip", &["-o", "link", "show", "type", "veth"]);
    for h in [&a, &b, &leak] {
        assert!(
            !namespaces.contains(&h.netns),
            "{} left: {namespaces:?}",
            h.netns
        );
        assert!(
            !veths.contains(&h.host_veth),
            "{} left: {veths}",
            h.host_veth
        );
    }
    assert!(!namespaces.contains(&guest_ns));

    // Tear down the host side explicitly once (the guard does it again, harmlessly).
    netsetup::teardown_host(&host).unwrap();
    assert!(!link_exists(&host.bridge));
    let tables = ok("nft", &["list", "tables"]);
    assert!(!tables.contains(&host.nft_table), "{tables}");
}
