//! Per-VM networking on the host: one bridge for all VMs, and for each VM a network
//! namespace holding its tap, joined to the bridge by a veth pair, with NAT and an egress
//! allow-list. The orchestrator runs the jailed VMM inside that namespace, so the tap it
//! opens is the namespace's.
//!
//! Boundary: this module builds and removes kernel objects (links, namespaces, netfilter
//! tables) by running `ip`, `bridge` and `nft`; it does not lease addresses (`store.rs`),
//! pick MACs (`net_addr::Mac::for_vm`) or start VMMs.
//!
//! Layout, with the default subnet 172.30.0.0/24:
//! ```text
//!  host netns                           netns orch-<vm_id>                  guest
//!  ┌───────────────────────┐  veth      ┌────────────────────────────┐  tap  ┌──────────┐
//!  │ bridge orch0          ├─ov<hash>───┤eth0 <leased>/24, vm's MAC  │       │ eth0     │
//!  │ 172.30.0.1/24 (gw)    │  isolated  │ default via 172.30.0.1     │       │10.200.0.2│
//!  │ nft inet orchestrator │  port      │ tap0 10.200.0.1/30 ────────┼───────┤ gw .1    │
//!  │  masquerade, isolation│            │ nft: DNAT/SNAT, allow-list │       └──────────┘
//!  └───────────────────────┘            └────────────────────────────┘
//! ```
//! - **Host** (`ensure_host`, idempotent): the bridge carries the subnet's first host
//!   address, the VMs' gateway. IPv4 forwarding is switched on. Our own nftables table
//!   (`inet orchestrator` by default, replaced atomically on every call) masquerades the
//!   subnet when it leaves through any interface other than the bridge, drops traffic
//!   routed from one VM to another (both in and out on the bridge), and drops new
//!   connections from elsewhere into the bridge unless a host DNAT rule asked for them.
//!   VM-to-bridge-address traffic is local delivery and is not filtered here.
//! - **Per VM** (`create_vm_net`): the namespace `orch-<vm_id>` (a file under
//!   `/run/netns`, the path to hand to `jailer --netns`); a veth pair whose host end
//!   `ov<8 hex of SHA-256(vm_id)>` is a bridge port with `isolated on`, so VMs cannot reach
//!   each other at layer 2 either; whose namespace end is `eth0` with the leased address,
//!   the VM's MAC and a default route via the gateway. Inside the namespace, the tap `tap0`
//!   (owned by the VMM's uid so the jailed VMM can attach without privileges) has the fixed
//!   address `TAP_IP`/30 and MAC `TAP_MAC`; the guest is always `GUEST_IP`.
//! - **Fixed guest side.** Every VM's guest sees the same addresses (`GUEST_IP`, gateway
//!   `TAP_IP`, gateway MAC `TAP_MAC`). A template snapshot therefore carries an IP
//!   configuration and ARP cache that stay valid in every clone's namespace. The leased
//!   address exists only on the namespace's `eth0`: nftables in the namespace DNATs
//!   leased → guest on the way in and SNATs guest → leased on the way out.
//! - **Egress allow-list** (namespace forward chain, policy drop): replies to established
//!   connections pass; anything from the bridge to the guest passes (host-side isolation
//!   already stops other VMs); the guest may always reach the gateway address; any other
//!   destination only if it lies in one of `VmNet::egress_allow`. An empty list therefore
//!   means "the gateway only"; `0.0.0.0/0` means everything. Packets from the tap with a
//!   source other than `GUEST_IP` are dropped (no spoofing).
//! - IPv6 is disabled inside each namespace: nothing here routes or filters it.
//!
//! Removal (`destroy_vm_net`) deletes the host veth (which takes its peer along) and the
//! namespace (which takes the tap along); only do it once the VMM has exited, since a
//! process inside keeps the namespace alive. `list_orphans` finds namespaces and host
//! veths whose VM the caller no longer knows, for the reconciler.
//!
//! Host firewalls are left alone: a different table whose forward chain drops by default
//! (e.g. Docker's) still blocks VM egress, and must be opened by the operator.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sched::{setns, CloneFlags};
use sha2::{Digest, Sha256};

use crate::net_addr::{Ipv4Cidr, Mac, Subnet};

/// Bridge name used when the operator configures none.
pub const DEFAULT_BRIDGE: &str = "orch0";
/// Host nftables table (family `inet`) used when the operator configures none.
pub const DEFAULT_NFT_TABLE: &str = "orchestrator";
/// Name of the nftables table (family `ip`) inside each VM's namespace.
pub const VM_NFT_TABLE: &str = "orchestrator_vm";
/// Prefix of each VM's namespace name: `orch-<vm_id>`.
pub const NETNS_PREFIX: &str = "orch-";
/// Prefix of each VM's host-side veth: `ov` + 8 hex digits.
pub const HOST_VETH_PREFIX: &str = "ov";
/// The namespace end of the veth pair.
pub const NETNS_UPLINK: &str = "eth0";
/// The tap inside each namespace, the one the VMM attaches to.
pub const TAP_NAME: &str = "tap0";
/// The tap's address: the guest's gateway. The same in every VM.
pub const TAP_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The guest's address. The same in every VM.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// Prefix length of the tap link: a /30 holding just `TAP_IP` and `GUEST_IP`.
pub const GUEST_PREFIX_LEN: u8 = 30;
/// Netmask of the tap link.
pub const GUEST_NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 252);
/// The guest's interface name, as the kernel's `ip=` parameter names it.
pub const GUEST_IFACE: &str = "eth0";
/// The tap's MAC, fixed so a restored template's ARP entry for its gateway stays right
/// (locally administered, unicast; octets 3..6 spell 10.200.0.1's last three bytes).
pub const TAP_MAC: Mac = Mac([0x06, 0x00, 0x0a, 0xc8, 0x00, 0x01]);
/// A MAC the VMM may give every guest NIC. The tap link is a private segment per VM, so
/// one value for all guests never clashes, and templates need the guest's MAC to be
/// fixed anyway. (`VmNet::mac`, the per-VM MAC, is the one seen on the bridge.)
pub const GUEST_MAC: Mac = Mac([0x06, 0x00, 0x0a, 0xc8, 0x00, 0x02]);
/// Longest VM id accepted; `orch-` + id must stay a short file name.
pub const MAX_VM_ID_LEN: usize = 32;

/// Where `ip netns add` keeps namespace files.
const NETNS_DIR: &str = "/run/netns";
/// Longest Linux interface name (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;
/// How much of a failed command's stderr an error keeps.
const MAX_STDERR: usize = 2000;

/// Errors from setting up or tearing down VM networking.
#[derive(Debug, thiserror::Error)]
pub enum NetSetupError {
    /// A VM id that cannot be used in names.
    #[error("invalid VM id {id:?}: {reason}")]
    InvalidVmId {
        /// The id given.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A bridge or nftables table name that is not accepted.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// "bridge" or "nftables table".
        what: &'static str,
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The lease subnet overlaps the fixed guest-side link.
    #[error("subnet {subnet} overlaps the guest-side link {GUEST_IP}/{GUEST_PREFIX_LEN}")]
    SubnetOverlapsGuestLink {
        /// The subnet configured.
        subnet: Subnet,
    },
    /// The VM's address is not a leasable address of the subnet.
    #[error("leased address {ip} is not leasable in {subnet}")]
    NotLeasable {
        /// The address given.
        ip: Ipv4Addr,
        /// The subnet configured.
        subnet: Subnet,
    },
    /// `create_vm_net` was called before `ensure_host`, or the name is not a bridge.
    #[error("{0} is missing or not a bridge; run ensure_host first")]
    NotABridge(String),
    /// Leftovers of an earlier VM with this id (or a veth name clash); destroy them first.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// `remove_orphan` was given a name that is not one of ours.
    #[error("{0:?} is not an orchestrator namespace or host veth")]
    NotOurs(String),
    /// A tool could not be started.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A tool ran and failed.
    #[error("`{program} {args}` failed ({status}): {stderr}")]
    Command {
        /// The program.
        program: &'static str,
        /// Its arguments, space-separated.
        args: String,
        /// How it ended.
        status: std::process::ExitStatus,
        /// Its standard error, trimmed and bounded.
        stderr: String,
    },
    /// Reading or writing a file (sysctl, namespace file, sysfs) failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Entering a VM's namespace failed.
    #[error("setns into {}", path.display())]
    Setns {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::errno::Errno,
    },
}

type Result<T> = std::result::Result<T, NetSetupError>;

/// Host-wide settings, shared by every VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNet {
    /// The bridge every VM's veth joins; it holds the subnet's gateway address.
    pub bridge: String,
    /// The lease pool; its first host address is the gateway.
    pub subnet: Subnet,
    /// The host nftables table (family `inet`) this module owns and replaces.
    pub nft_table: String,
    /// Whether VMs are kept from talking to each other (default true).
    pub isolate_vms: bool,
}

impl HostNet {
    /// A host network on `bridge` for `subnet`, with the default table and isolation on.
    pub fn new(bridge: String, subnet: Subnet) -> HostNet {
        HostNet {
            bridge,
            subnet,
            ..HostNet::default()
        }
    }
}

impl Default for HostNet {
    fn default() -> Self {
        HostNet {
            bridge: DEFAULT_BRIDGE.to_string(),
            subnet: Subnet::default(),
            nft_table: DEFAULT_NFT_TABLE.to_string(),
            isolate_vms: true,
        }
    }
}

/// One VM's network parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNet {
    /// The VM id: 1 to 32 characters of `[a-z0-9-]`.
    pub vm_id: String,
    /// The address leased to the VM, a leasable address of `HostNet::subnet`.
    pub leased_ip: Ipv4Addr,
    /// Destinations the guest may reach besides the gateway; `0.0.0.0/0` allows all.
    pub egress_allow: Vec<Ipv4Cidr>,
    /// The VM's MAC, given to the namespace end of the veth (the one on the bridge).
    pub mac: Mac,
    /// The uid that owns the tap: the uid the jailed VMM runs as.
    pub tap_owner: u32,
}

/// What `create_vm_net` made, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNetHandle {
    /// The VM id.
    pub vm_id: String,
    /// The namespace name (`orch-<vm_id>`).
    pub netns: String,
    /// The namespace file, for `jailer --netns`.
    pub netns_path: PathBuf,
    /// The host end of the veth pair.
    pub host_veth: String,
    /// The tap inside the namespace.
    pub tap: &'static str,
    /// The VM's leased address (on the namespace's `eth0`).
    pub leased_ip: Ipv4Addr,
    /// The gateway (the bridge's address).
    pub gateway: Ipv4Addr,
}

/// What `destroy_vm_net` found and removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemovedNet {
    /// The namespace was there and is gone.
    pub netns: bool,
    /// The host veth was there and is gone.
    pub host_veth: bool,
}

/// Checks a VM id is 1 to `MAX_VM_ID_LEN` characters of `[a-z0-9-]`.
pub fn validate_vm_id(id: &str) -> Result<()> {
    let bad = |reason| NetSetupError::InvalidVmId {
        id: id.chars().take(64).collect(),
        reason,
    };
    if id.is_empty() {
        return Err(bad("empty"));
    }
    if id.len() > MAX_VM_ID_LEN {
        return Err(bad("longer than 32 characters"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(bad("only a-z, 0-9 and '-' are allowed"));
    }
    Ok(())
}

/// The namespace name of a VM: `orch-<vm_id>`.
pub fn netns_name(vm_id: &str) -> Result<String> {
    validate_vm_id(vm_id)?;
    Ok(format!("{NETNS_PREFIX}{vm_id}"))
}

/// The namespace file of a VM: `/run/netns/orch-<vm_id>`.
pub fn netns_path(vm_id: &str) -> Result<PathBuf> {
    Ok(Path::new(NETNS_DIR).join(netns_name(vm_id)?))
}

/// The host-side veth of a VM: `ov` + the first 4 bytes of SHA-256("orchestrator-veth\0"
/// || vm_id) in hex. Interface names stop at 15 characters, too short for the id itself.
/// Two ids sharing a name (odds 2^-32 per pair) make the second create fail, not share.
pub fn host_veth_name(vm_id: &str) -> Result<String> {
    validate_vm_id(vm_id)?;
    let digest = Sha256::new()
        .chain_update(b"orchestrator-veth\0")
        .chain_update(vm_id.as_bytes())
        .finalize();
    let mut name = String::from(HOST_VETH_PREFIX);
    for b in &digest[..4] {
        name.push_str(&format!("{b:02x}"));
    }
    Ok(name)
}

/// The kernel parameter that configures the guest's side (the guest kernel's IP
/// autoconfiguration, `CONFIG_IP_PNP`, reads it; guest-init does not parse it):
/// `ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>`.
pub fn guest_kernel_ip_param() -> String {
    format!("ip={GUEST_IP}::{TAP_IP}:{GUEST_NETMASK}::{GUEST_IFACE}:off")
}

/// Sets up the host side: bridge with the gateway address, up; IPv4 forwarding on; our
/// nftables table replaced. Safe to call again at any time, also while VMs run.
pub fn ensure_host(host: &HostNet) -> Result<()> {
    validate_host(host)?;
    let br = host.bridge.as_str();
    if !sys_net(br).exists() {
        // A concurrent caller may create it first; only a bridge still missing is an error.
        let made = ip(&["link", "add", "name", br, "type", "bridge"]);
        if let Err(e) = made {
            if !sys_net(br).exists() {
                return Err(e);
            }
        }
    }
    if !sys_net(br).join("bridge").exists() {
        return Err(NetSetupError::NotABridge(host.bridge.clone()));
    }
    let gw = format!("{}/{}", host.subnet.gateway(), host.subnet.prefix_len());
    ip(&["addr", "replace", &gw, "dev", br])?;
    ip(&["link", "set", "dev", br, "up"])?;
    write_file(Path::new("/proc/sys/net/ipv4/ip_forward"), "1")?;
    run("nft", &["-f", "-"], Some(&host_ruleset(host)))?;
    Ok(())
}

/// Removes our host nftables table and the bridge (for tests and uninstall). IPv4
/// forwarding is left on: other software may rely on it. VM namespaces are not touched.
pub fn teardown_host(host: &HostNet) -> Result<()> {
    validate_host(host)?;
    let t = &host.nft_table;
    run(
        "nft",
        &["-f", "-"],
        Some(&format!("table inet {t}\ndelete table inet {t}\n")),
    )?;
    if sys_net(&host.bridge).exists() {
        run_unless_gone(
            "ip",
            &["link", "del", "dev", &host.bridge],
            &sys_net(&host.bridge),
        )?;
    }
    Ok(())
}

/// Creates one VM's namespace, veth pair, tap and rules (see the module docs). The host
/// must be set up (`ensure_host`). Refuses if the namespace or host veth already exists;
/// on failure removes what it made.
pub fn create_vm_net(host: &HostNet, vm: &VmNet) -> Result<VmNetHandle> {
    validate_host(host)?;
    let ns = netns_name(&vm.vm_id)?;
    let ov = host_veth_name(&vm.vm_id)?;
    if !host.subnet.is_leasable(vm.leased_ip) {
        return Err(NetSetupError::NotLeasable {
            ip: vm.leased_ip,
            subnet: host.subnet,
        });
    }
    if !sys_net(&host.bridge).join("bridge").exists() {
        return Err(NetSetupError::NotABridge(host.bridge.clone()));
    }
    let ns_path = Path::new(NETNS_DIR).join(&ns);
    if ns_path.exists() {
        return Err(NetSetupError::AlreadyExists(format!("netns {ns}")));
    }
    if sys_net(&ov).exists() {
        return Err(NetSetupError::AlreadyExists(format!("host veth {ov}")));
    }
    ip(&["netns", "add", &ns])?;
    match build_vm_net(host, vm, &ns, &ns_path, &ov) {
        Ok(()) => Ok(VmNetHandle {
            vm_id: vm.vm_id.clone(),
            netns: ns,
            netns_path: ns_path,
            host_veth: ov,
            tap: TAP_NAME,
            leased_ip: vm.leased_ip,
            gateway: host.subnet.gateway(),
        }),
        Err(e) => {
            // Both names were free before we started, so everything under them is ours.
            let _ = destroy_vm_net(&vm.vm_id);
            Err(e)
        }
    }
}

/// Creates the namespace of a VM without networking: only `lo`, up. The VMM still runs
/// in its own namespace, so it sees no host interface. `destroy_vm_net` removes it.
pub fn create_offline_netns(vm_id: &str) -> Result<PathBuf> {
    let ns = netns_name(vm_id)?;
    let ns_path = Path::new(NETNS_DIR).join(&ns);
    if ns_path.exists() {
        return Err(NetSetupError::AlreadyExists(format!("netns {ns}")));
    }
    ip(&["netns", "add", &ns])?;
    match ip(&["-n", &ns, "link", "set", "dev", "lo", "up"]) {
        Ok(_) => Ok(ns_path),
        Err(e) => {
            let _ = destroy_vm_net(vm_id);
            Err(e)
        }
    }
}

/// Creates the namespace a template VM boots in: `lo` and the VM-side `tap0` exactly as
/// in every VM's namespace (address, MAC, owner), and nothing else: the template reaches
/// no network, while its guest configures the same interface its clones will use.
/// `destroy_vm_net` removes it.
pub fn create_template_netns(vm_id: &str, tap_owner: u32) -> Result<PathBuf> {
    let ns_path = create_offline_netns(vm_id)?;
    let ns = netns_name(vm_id)?;
    let uid = tap_owner.to_string();
    let tap_mac = TAP_MAC.to_string();
    let tap_addr = format!("{TAP_IP}/{GUEST_PREFIX_LEN}");
    let steps: [&[&str]; 4] = [
        &[
            "tuntap", "add", "dev", TAP_NAME, "mode", "tap", "user", &uid,
        ],
        &["link", "set", "dev", TAP_NAME, "address", &tap_mac],
        &["addr", "add", &tap_addr, "dev", TAP_NAME],
        &["link", "set", "dev", TAP_NAME, "up"],
    ];
    for step in steps {
        let mut args = vec!["-n", ns.as_str()];
        args.extend_from_slice(step);
        if let Err(e) = run("ip", &args, None) {
            let _ = destroy_vm_net(vm_id);
            return Err(e);
        }
    }
    Ok(ns_path)
}

/// Everything after `ip netns add`.
fn build_vm_net(host: &HostNet, vm: &VmNet, ns: &str, ns_path: &Path, ov: &str) -> Result<()> {
    // Before any link exists, so `default` covers eth0 and tap0 too.
    netns_sysctls(
        ns_path,
        &[
            ("/proc/sys/net/ipv4/ip_forward", "1", true),
            ("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1", false),
            ("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1", false),
        ],
    )?;
    let isolated = if host.isolate_vms { "on" } else { "off" };
    let peer = ["peer", "name", NETNS_UPLINK, "netns", ns];
    ip(&[&["link", "add", ov, "type", "veth"][..], &peer].concat())?;
    ip(&["link", "set", "dev", ov, "master", &host.bridge])?;
    run(
        "bridge",
        &["link", "set", "dev", ov, "isolated", isolated],
        None,
    )?;
    ip(&["link", "set", "dev", ov, "up"])?;

    let mac = vm.mac.to_string();
    let leased = format!("{}/{}", vm.leased_ip, host.subnet.prefix_len());
    let gw = host.subnet.gateway().to_string();
    let uid = vm.tap_owner.to_string();
    let tap_mac = TAP_MAC.to_string();
    let tap_addr = format!("{TAP_IP}/{GUEST_PREFIX_LEN}");
    let steps: [&[&str]; 9] = [
        &["link", "set", "dev", "lo", "up"],
        &["link", "set", "dev", NETNS_UPLINK, "address", &mac],
        &["addr", "add", &leased, "dev", NETNS_UPLINK],
        &["link", "set", "dev", NETNS_UPLINK, "up"],
        &["route", "add", "default", "via", &gw, "dev", NETNS_UPLINK],
        &[
            "tuntap", "add", "dev", TAP_NAME, "mode", "tap", "user", &uid,
        ],
        &["link", "set", "dev", TAP_NAME, "address", &tap_mac],
        &["addr", "add", &tap_addr, "dev", TAP_NAME],
        &["link", "set", "dev", TAP_NAME, "up"],
    ];
    for step in steps {
        let mut args = vec!["-n", ns];
        args.extend_from_slice(step);
        run("ip", &args, None)?;
    }
    run(
        "ip",
        &["netns", "exec", ns, "nft", "-f", "-"],
        Some(&vm_ruleset(host, vm)),
    )?;
    Ok(())
}

/// Removes a VM's host veth and namespace (taking eth0 and tap0 with it). Missing pieces
/// are fine; the result says what was there. Call it after the VMM has exited.
pub fn destroy_vm_net(vm_id: &str) -> Result<RemovedNet> {
    let ns = netns_name(vm_id)?;
    let ov = host_veth_name(vm_id)?;
    let mut removed = RemovedNet::default();
    // The veth first: deleting a link is synchronous, while a namespace's links go away
    // in a kernel work queue some time after `ip netns del`.
    let ov_sys = sys_net(&ov);
    if ov_sys.exists() {
        removed.host_veth = run_unless_gone("ip", &["link", "del", "dev", &ov], &ov_sys)?;
    }
    let ns_path = Path::new(NETNS_DIR).join(&ns);
    if ns_path.exists() {
        removed.netns = run_unless_gone("ip", &["netns", "del", &ns], &ns_path)?;
    }
    Ok(removed)
}

/// Names of our namespaces (`orch-*`) and host veths (`ov` + 8 hex) that belong to none of
/// `known_vm_ids`, sorted. Give each to `remove_orphan`.
pub fn list_orphans<S: AsRef<str>>(known_vm_ids: &[S]) -> Result<Vec<String>> {
    let mut known = HashSet::new();
    for id in known_vm_ids {
        // An id that is not valid has no names; it cannot keep anything alive.
        if let (Ok(ns), Ok(ov)) = (netns_name(id.as_ref()), host_veth_name(id.as_ref())) {
            known.insert(ns);
            known.insert(ov);
        }
    }
    let mut orphans = Vec::new();
    match fs::read_dir(NETNS_DIR) {
        Ok(dir) => {
            for entry in dir {
                let entry = entry.map_err(io_err("listing", NETNS_DIR))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(NETNS_PREFIX) && !known.contains(&name) {
                    orphans.push(name);
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("listing", NETNS_DIR)(e)),
    }
    let links = ip(&["-o", "link", "show", "type", "veth"])?;
    for line in links.lines() {
        // "7: ov1a2b3c4d@if6: <BROADCAST,..." (the @ part is there for a veth's peer).
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        if is_host_veth_name(name) && !known.contains(name) {
            orphans.push(name.to_string());
        }
    }
    orphans.sort();
    orphans.dedup();
    Ok(orphans)
}

/// Removes one name returned by `list_orphans`: a namespace (with its VM's host veth) or a
/// host veth. Returns whether something was removed.
pub fn remove_orphan(name: &str) -> Result<bool> {
    if let Some(id) = name.strip_prefix(NETNS_PREFIX) {
        if validate_vm_id(id).is_ok() {
            let r = destroy_vm_net(id)?;
            return Ok(r.netns || r.host_veth);
        }
        // Not made by this version, but ours by name; a plain file name only.
        if name.contains('/') || name.contains('\0') {
            return Err(NetSetupError::NotOurs(name.to_string()));
        }
        let path = Path::new(NETNS_DIR).join(name);
        return match path.exists() {
            true => run_unless_gone("ip", &["netns", "del", name], &path),
            false => Ok(false),
        };
    }
    if is_host_veth_name(name) {
        let path = sys_net(name);
        return match path.exists() {
            true => run_unless_gone("ip", &["link", "del", "dev", name], &path),
            false => Ok(false),
        };
    }
    Err(NetSetupError::NotOurs(name.to_string()))
}

/// The host table: NAT for the subnet's egress, VM isolation, no unsolicited inbound.
/// Written as "create, delete, define" so one `nft -f` transaction replaces it atomically.
pub fn host_ruleset(host: &HostNet) -> String {
    let t = &host.nft_table;
    let br = &host.bridge;
    let subnet = host.subnet;
    let vm_to_vm = if host.isolate_vms { "drop" } else { "accept" };
    format!(
        "table inet {t}
delete table inet {t}
table inet {t} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {subnet} oifname != \"{br}\" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname \"{br}\" oifname \"{br}\" {vm_to_vm} comment \"VM to VM, routed\"
        oifname \"{br}\" ct state established,related accept
        oifname \"{br}\" ct status dnat accept comment \"host port forwards\"
        oifname \"{br}\" drop comment \"unsolicited inbound\"
    }}
}}
"
    )
}

/// The table inside a VM's namespace: leased ↔ guest NAT and the egress allow-list.
pub fn vm_ruleset(host: &HostNet, vm: &VmNet) -> String {
    let t = VM_NFT_TABLE;
    let leased = vm.leased_ip;
    let gw = host.subnet.gateway();
    let up = NETNS_UPLINK;
    let tap = TAP_NAME;
    let out = format!("iifname \"{tap}\" oifname \"{up}\" ip saddr {GUEST_IP}");
    let mut allow = String::new();
    for cidr in &vm.egress_allow {
        if cidr.prefix_len() == 0 {
            allow.push_str(&format!("        {out} accept comment \"egress: all\"\n"));
        } else {
            allow.push_str(&format!("        {out} ip daddr {cidr} accept\n"));
        }
    }
    format!(
        "table ip {t}
delete table ip {t}
table ip {t} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname \"{up}\" ip daddr {leased} dnat to {GUEST_IP}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname \"{up}\" ip saddr {GUEST_IP} snat to {leased}
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname \"{up}\" oifname \"{tap}\" ip daddr {GUEST_IP} accept
        {out} ip daddr {gw} accept comment \"gateway\"
{allow}    }}
}}
"
    )
}

fn validate_host(host: &HostNet) -> Result<()> {
    let bad = |what, reason| NetSetupError::InvalidName {
        what,
        name: host.bridge.chars().take(64).collect(),
        reason,
    };
    let br = &host.bridge;
    if br.is_empty() || br.len() > MAX_IFNAME_LEN {
        return Err(bad("bridge", "must be 1 to 15 characters"));
    }
    if !br
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(bad("bridge", "only a-z, A-Z, 0-9, '-' and '_' are allowed"));
    }
    if is_host_veth_name(br) || br == NETNS_UPLINK || br == TAP_NAME {
        return Err(bad("bridge", "clashes with a per-VM interface name"));
    }
    let t = &host.nft_table;
    let table_ok = !t.is_empty()
        && t.len() <= 64
        && t.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !table_ok {
        return Err(NetSetupError::InvalidName {
            what: "nftables table",
            name: t.chars().take(64).collect(),
            reason: "must be a letter then up to 63 letters, digits or '_'",
        });
    }
    let guest_link = host.subnet.cidr();
    if guest_link.contains(TAP_IP) || guest_link.contains(GUEST_IP) {
        return Err(NetSetupError::SubnetOverlapsGuestLink {
            subnet: host.subnet,
        });
    }
    Ok(())
}

fn is_host_veth_name(name: &str) -> bool {
    name.strip_prefix(HOST_VETH_PREFIX).is_some_and(|hex| {
        hex.len() == 8
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn sys_net(ifname: &str) -> PathBuf {
    Path::new("/sys/class/net").join(ifname)
}

fn io_err(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> NetSetupError {
    let path = path.into();
    move |source| NetSetupError::Io { what, path, source }
}

fn write_file(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(io_err("writing", path))
}

/// Writes sysctls inside a namespace from a short-lived thread that joined it: /proc/sys/net
/// shows the calling thread's namespace. Entries marked not required may be missing (no
/// IPv6 in the kernel).
fn netns_sysctls(ns_path: &Path, settings: &[(&str, &str, bool)]) -> Result<()> {
    let ns = File::open(ns_path).map_err(io_err("opening", ns_path))?;
    let joined = std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|source| NetSetupError::Setns {
                path: ns_path.to_path_buf(),
                source,
            })?;
            for &(path, value, required) in settings {
                match fs::write(path, value) {
                    Ok(()) => {}
                    Err(e) if !required && e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("writing", path)(e)),
                }
            }
            Ok(())
        })
        .join()
    });
    match joined {
        Ok(result) => result,
        // The closure does not panic; should it, report it as an I/O failure, not a panic.
        Err(_) => Err(NetSetupError::Io {
            what: "sysctl thread panicked in",
            path: ns_path.to_path_buf(),
            source: io::Error::other("panic"),
        }),
    }
}

/// Runs `ip args`.
fn ip(args: &[&str]) -> Result<String> {
    run("ip", args, None)
}

/// Runs `program args`, feeding `stdin` if given; returns stdout on success.
fn run(program: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_err = |source| NetSetupError::Spawn { program, source };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error (the tool exited early) shows up in its status and stderr below.
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let mut stderr: String = String::from_utf8_lossy(&out.stderr)
        .trim()
        .chars()
        .take(MAX_STDERR)
        .collect();
    if stderr.is_empty() {
        stderr = "(no stderr)".into();
    }
    Err(NetSetupError::Command {
        program,
        args: args.join(" "),
        status: out.status,
        stderr,
    })
}

/// Runs a removal; a failure only counts if `path` still exists afterwards (someone else
/// removed it first). Returns whether this call removed it.
fn run_unless_gone(program: &'static str, args: &[&str], path: &Path) -> Result<bool> {
    match run(program, args, None) {
        Ok(_) => Ok(true),
        Err(_) if !path.exists() => Ok(false),
        Err(e) => Err(e),
    }
}

// The public functions' pure behaviour (names, rulesets, validation) is tested in
// tests/netsetup.rs; here only what is private.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names() {
        let ov = host_veth_name("vm-1").unwrap();
        assert!(is_host_veth_name(&ov), "{ov}");
        for bad in [
            "ov1234567",
            "ov1234567G",
            "ovABCDEF12",
            "ov123456789",
            "orch0",
        ] {
            assert!(!is_host_veth_name(bad), "{bad}");
        }
    }

    #[test]
    fn host_validation() {
        validate_host(&HostNet::default()).unwrap();
        let with = |f: fn(&mut HostNet)| {
            let mut h = HostNet::default();
            f(&mut h);
            validate_host(&h)
        };
        assert!(with(|h| h.bridge = String::new()).is_err());
        assert!(with(|h| h.bridge = "a-very-long-bridge".into()).is_err());
        assert!(with(|h| h.bridge = "br 0".into()).is_err());
        assert!(with(|h| h.bridge = "ov12345678".into()).is_err());
        assert!(with(|h| h.nft_table = "1abc".into()).is_err());
        assert!(with(|h| h.nft_table = "a-b".into()).is_err());
        assert!(matches!(
            with(|h| h.subnet = "10.200.0.0/24".parse().unwrap()),
            Err(NetSetupError::SubnetOverlapsGuestLink { .. })
        ));
    }
}
