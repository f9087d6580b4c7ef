//! The VM's configuration: from a JSON file shaped like Firecracker's `--config-file`
//! (`boot-source`, `machine-config`; our own `console` and `boot_timer`), from command-line
//! flags, or both (flags win). [`VmConfig::validate`] checks everything a user can get wrong
//! before any KVM object exists, and names the field.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::layout::CMDLINE_MAX_SIZE;
use crate::arch::mptable::MAX_CPUS;

/// Command line used when none is given: serial console, reboot through the i8042 (which
/// ends the VMM), and reboot at once on a panic so a broken guest never hangs.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=-1";

/// Errors in a configuration, each naming the field or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid JSON of the expected shape.
    #[error("config file {path}: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde's message, with the field and line.
        msg: String,
    },
    /// A field has a value that cannot work.
    #[error("{field}: {reason}")]
    Invalid {
        /// Dotted field name, as in the JSON file.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// `boot-source`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// ELF vmlinux or bzImage.
    pub kernel_image_path: PathBuf,
    /// Optional initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// Kernel command line; [`DEFAULT_BOOT_ARGS`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// Backing for guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Normal 4 KiB pages.
    #[default]
    None,
    /// 2 MiB hugetlbfs pages (needs pages reserved in /proc/sys/vm/nr_hugepages).
    #[serde(rename = "2M")]
    Huge2M,
}

/// `machine-config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1 to 254.
    pub vcpu_count: u16,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Accepted for Firecracker compatibility; must be false (no SMT topology).
    #[serde(default)]
    pub smt: bool,
    /// Guest memory page size.
    #[serde(default)]
    pub huge_pages: HugePages,
    /// Advise transparent huge pages on guest RAM (`MADV_HUGEPAGE`; ours, not
    /// Firecracker's). Guest RAM is always placed at 2 MiB-aligned host addresses; this
    /// also asks hosts whose THP mode is `madvise` for huge pages, as qemu does. The guest
    /// then boots with far fewer second-level page faults; the host grants its memory in
    /// 2 MiB steps. Ignored with `huge_pages: "2M"` and for restored VMs (their memory is
    /// a file mapping).
    #[serde(default = "default_thp")]
    pub thp: bool,
}

fn default_thp() -> bool {
    true
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            huge_pages: HugePages::None,
            thp: true,
        }
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// This process's stdout (and stdin as input when it is a terminal).
    #[default]
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    None,
}

impl ConsoleTarget {
    /// `stdout`, `none`, or anything else as a file path.
    pub fn parse(s: &str) -> ConsoleTarget {
        match s {
            "stdout" => ConsoleTarget::Stdout,
            "none" => ConsoleTarget::None,
            path => ConsoleTarget::File(PathBuf::from(path)),
        }
    }
}

impl Serialize for ConsoleTarget {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ConsoleTarget::Stdout => s.serialize_str("stdout"),
            ConsoleTarget::None => s.serialize_str("none"),
            ConsoleTarget::File(p) => s.serialize_str(&p.to_string_lossy()),
        }
    }
}

impl<'de> Deserialize<'de> for ConsoleTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(ConsoleTarget::parse(&s))
    }
}

/// One entry of `drives`: a virtio-blk disk backed by a raw file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Identifier; also the serial the guest reads (`/sys/block/vdX/serial`, GET_ID).
    pub drive_id: String,
    /// Raw disk image.
    pub path_on_host: PathBuf,
    /// Mount it as the root filesystem (`root=/dev/vda`); it becomes the first disk.
    #[serde(default)]
    pub is_root_device: bool,
    /// The guest cannot write to it.
    #[serde(default)]
    pub is_read_only: bool,
}

/// Longest drive id: virtio-blk's GET_ID answer is 20 bytes.
pub const MAX_DRIVE_ID_LEN: usize = 20;
/// Largest guest RAM accepted whatever the host says (1 TiB), so sizes in bytes never
/// overflow even if the host's RAM cannot be read.
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Interrupt lines for virtio devices: IOAPIC pins 5 to 23.
pub const MAX_VIRTIO_DEVICES: usize = 19;

impl DriveConfig {
    /// Parses the `--drive` flag: `path=PATH,id=ID[,readonly=BOOL][,root=BOOL]`.
    pub fn parse_flag(text: &str) -> Result<DriveConfig, ConfigError> {
        let mut d = DriveConfig::default();
        let mut have_path = false;
        for part in text.split(',') {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let flag = |v: &str| match v {
                "true" | "on" | "yes" | "1" | "" => Ok(true),
                "false" | "off" | "no" | "0" => Ok(false),
                other => Err(invalid(
                    "--drive",
                    format!("{k}={other}: expected true or false"),
                )),
            };
            match k {
                "path" => {
                    d.path_on_host = PathBuf::from(v);
                    have_path = true;
                }
                "id" => d.drive_id = v.to_string(),
                "readonly" | "ro" => d.is_read_only = flag(v)?,
                "root" => d.is_root_device = flag(v)?,
                other => {
                    return Err(invalid(
                        "--drive",
                        format!("unknown key {other:?} (keys: path, id, readonly, root)"),
                    ))
                }
            }
        }
        if !have_path || d.path_on_host.as_os_str().is_empty() {
            return Err(invalid("--drive", "path= is required"));
        }
        if d.drive_id.is_empty() {
            return Err(invalid("--drive", "id= is required"));
        }
        Ok(d)
    }
}

/// One entry of `network-interfaces`: a virtio-net device on a host tap.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Identifier (for the API and logs).
    pub iface_id: String,
    /// Name of an existing tap device on the host.
    pub host_dev_name: String,
    /// Guest MAC as `aa:bb:cc:dd:ee:ff`; a random locally administered one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// MTU offered to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

impl NetConfig {
    /// Parses `--net tap=NAME[,mac=MAC][,mtu=N][,id=ID]`.
    pub fn parse_flag(text: &str) -> Result<NetConfig, ConfigError> {
        let mut n = NetConfig::default();
        for part in text.split(',') {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            match k {
                "tap" => n.host_dev_name = v.to_string(),
                "mac" => n.guest_mac = Some(v.to_string()),
                "mtu" => {
                    n.mtu = Some(v.parse().map_err(|_| {
                        invalid("--net", format!("mtu={v}: expected a number 68 to 65535"))
                    })?)
                }
                "id" => n.iface_id = v.to_string(),
                other => {
                    return Err(invalid(
                        "--net",
                        format!("unknown key {other:?} (keys: tap, mac, mtu, id)"),
                    ))
                }
            }
        }
        if n.host_dev_name.is_empty() {
            return Err(invalid("--net", "tap= is required"));
        }
        if n.iface_id.is_empty() {
            n.iface_id = n.host_dev_name.clone();
        }
        Ok(n)
    }

    /// The MAC as bytes, if one was given.
    pub fn mac_bytes(&self) -> Result<Option<[u8; 6]>, ConfigError> {
        let Some(text) = &self.guest_mac else {
            return Ok(None);
        };
        let bad = || {
            invalid(
                "network-interfaces.guest_mac",
                format!("{text:?} is not a MAC like 06:00:ac:10:00:02"),
            )
        };
        let mut mac = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut mac {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if mac[0] & 1 == 1 {
            return Err(invalid(
                "network-interfaces.guest_mac",
                format!("{text} is a multicast address"),
            ));
        }
        Ok(Some(mac))
    }
}

/// `vsock`: a virtio-vsock device whose host side is a unix socket (Firecracker's hybrid
/// vsock).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Accepted for Firecracker compatibility.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    /// The guest's context id, 3 or more.
    pub guest_cid: u64,
    /// Unix socket the host connects to (`CONNECT <port>`); guest connections to host
    /// port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// Parses `--vsock cid=N,uds=PATH`.
    pub fn parse_flag(text: &str) -> Result<VsockConfig, ConfigError> {
        let mut v = VsockConfig::default();
        for part in text.split(',') {
            let (k, val) = part.split_once('=').unwrap_or((part, ""));
            match k {
                "cid" => {
                    v.guest_cid = val
                        .parse()
                        .map_err(|_| invalid("--vsock", format!("cid={val}: expected a number")))?
                }
                "uds" => v.uds_path = PathBuf::from(val),
                other => {
                    return Err(invalid(
                        "--vsock",
                        format!("unknown key {other:?} (keys: cid, uds)"),
                    ))
                }
            }
        }
        if v.uds_path.as_os_str().is_empty() {
            return Err(invalid("--vsock", "uds= is required"));
        }
        Ok(v)
    }
}

/// The whole VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel, initrd, command line.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine: MachineConfig,
    /// Serial console output.
    #[serde(default)]
    pub console: ConsoleTarget,
    /// Print the time from VMM start to guest-init's ready mark.
    #[serde(default)]
    pub boot_timer: bool,
    /// virtio-blk disks, in the order the guest sees them (the root device first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<DriveConfig>,
    /// Attach a virtio-rng device (default on) so the guest never waits for entropy.
    #[serde(default = "default_true")]
    pub entropy: bool,
    /// virtio-net devices.
    #[serde(
        rename = "network-interfaces",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub net: Vec<NetConfig>,
    /// The virtio-vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
}

fn default_true() -> bool {
    true
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            boot_source: BootSource::default(),
            machine: MachineConfig::default(),
            console: ConsoleTarget::default(),
            boot_timer: false,
            drives: Vec::new(),
            entropy: true,
            net: Vec::new(),
            vsock: None,
        }
    }
}

impl VmConfig {
    /// Reads a JSON config file.
    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            msg: e.to_string(),
        })
    }

    /// The command line the guest will get (before devices add theirs).
    pub fn boot_args(&self) -> &str {
        self.boot_source
            .boot_args
            .as_deref()
            .unwrap_or(DEFAULT_BOOT_ARGS)
    }

    /// Checks what can be checked without KVM: counts, sizes, and that files exist and are
    /// readable. `host_mem_mib` is the host's RAM, the upper bound for guest memory.
    pub fn validate(&self, host_mem_mib: u64) -> Result<(), ConfigError> {
        self.validate_machine(host_mem_mib)?;
        self.validate_boot_source()?;
        self.validate_devices()
    }

    /// `machine-config` alone (the API checks each section as it is set).
    pub fn validate_machine(&self, host_mem_mib: u64) -> Result<(), ConfigError> {
        let m = &self.machine;
        if m.vcpu_count == 0 || m.vcpu_count > u16::from(MAX_CPUS) {
            return Err(invalid(
                "machine-config.vcpu_count",
                format!("{} is out of range (1 to {MAX_CPUS})", m.vcpu_count),
            ));
        }
        if m.smt {
            return Err(invalid(
                "machine-config.smt",
                "SMT is not supported; set false",
            ));
        }
        if m.mem_size_mib == 0 {
            return Err(invalid("machine-config.mem_size_mib", "must be at least 1"));
        }
        if m.mem_size_mib > host_mem_mib.min(MAX_MEM_MIB) {
            return Err(invalid(
                "machine-config.mem_size_mib",
                format!(
                    "{} MiB is more than this host's {host_mem_mib} MiB of RAM (or the {MAX_MEM_MIB} MiB limit)",
                    m.mem_size_mib
                ),
            ));
        }
        Ok(())
    }

    /// `boot-source` alone: the kernel and initrd are readable files, the command line fits.
    pub fn validate_boot_source(&self) -> Result<(), ConfigError> {
        let kernel = &self.boot_source.kernel_image_path;
        if kernel.as_os_str().is_empty() {
            return Err(invalid("boot-source.kernel_image_path", "no kernel given"));
        }
        check_readable("boot-source.kernel_image_path", kernel)?;
        if let Some(initrd) = &self.boot_source.initrd_path {
            check_readable("boot-source.initrd_path", initrd)?;
        }
        let args = self.boot_args();
        if args.len() >= CMDLINE_MAX_SIZE {
            return Err(invalid(
                "boot-source.boot_args",
                format!(
                    "{} bytes; the kernel takes at most {}",
                    args.len(),
                    CMDLINE_MAX_SIZE - 1
                ),
            ));
        }
        Ok(())
    }
}

impl VmConfig {
    /// The devices alone: `drives`, `network-interfaces`, `vsock` and their count.
    pub fn validate_devices(&self) -> Result<(), ConfigError> {
        let devices = self.drives.len()
            + usize::from(self.entropy)
            + self.net.len()
            + usize::from(self.vsock.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(invalid(
                "drives",
                format!("{devices} virtio devices; at most {MAX_VIRTIO_DEVICES} fit"),
            ));
        }
        let mut ids = std::collections::HashSet::new();
        let mut roots = 0;
        for d in &self.drives {
            if d.drive_id.is_empty() || d.drive_id.len() > MAX_DRIVE_ID_LEN {
                return Err(invalid(
                    "drives.drive_id",
                    format!("{:?} must be 1 to {MAX_DRIVE_ID_LEN} bytes", d.drive_id),
                ));
            }
            if !d.drive_id.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    "drives.drive_id",
                    format!("{:?} must be printable ASCII without spaces", d.drive_id),
                ));
            }
            if !ids.insert(d.drive_id.as_str()) {
                return Err(invalid(
                    "drives.drive_id",
                    format!("{:?} is used twice", d.drive_id),
                ));
            }
            roots += usize::from(d.is_root_device);
            check_readable("drives.path_on_host", &d.path_on_host)?;
            if !d.is_read_only {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&d.path_on_host)
                    .map_err(|e| {
                        invalid(
                            "drives.path_on_host",
                            format!(
                                "{} is not writable ({e}); set is_read_only",
                                d.path_on_host.display()
                            ),
                        )
                    })?;
            }
        }
        if roots > 1 {
            return Err(invalid(
                "drives.is_root_device",
                "more than one root device",
            ));
        }
        self.validate_net_and_vsock()
    }

    fn validate_net_and_vsock(&self) -> Result<(), ConfigError> {
        let mut ifaces = std::collections::HashSet::new();
        for n in &self.net {
            if !ifaces.insert(n.iface_id.as_str()) {
                return Err(invalid(
                    "network-interfaces.iface_id",
                    format!("{:?} is used twice", n.iface_id),
                ));
            }
            if n.host_dev_name.is_empty() || n.host_dev_name.len() > 15 {
                return Err(invalid(
                    "network-interfaces.host_dev_name",
                    format!(
                        "{:?} must be 1 to 15 bytes (a Linux interface name)",
                        n.host_dev_name
                    ),
                ));
            }
            n.mac_bytes()?;
            if let Some(mtu) = n.mtu {
                if mtu < 68 {
                    return Err(invalid(
                        "network-interfaces.mtu",
                        format!("{mtu} is below 68"),
                    ));
                }
            }
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX) {
                return Err(invalid(
                    "vsock.guest_cid",
                    format!("{} is reserved or too large (3 to 4294967295)", v.guest_cid),
                ));
            }
            if v.uds_path.as_os_str().is_empty() {
                return Err(invalid("vsock.uds_path", "no path given"));
            }
        }
        Ok(())
    }

    /// Drives in the order they are attached: the root device first, so it is /dev/vda.
    pub fn ordered_drives(&self) -> Vec<&DriveConfig> {
        let mut v: Vec<&DriveConfig> = self.drives.iter().collect();
        v.sort_by_key(|d| !d.is_root_device);
        v
    }
}

fn check_readable(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::File::open(path).and_then(|f| f.metadata()) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(invalid(
            field,
            format!("{} is not a regular file", path.display()),
        )),
        Err(e) => Err(invalid(field, format!("{}: {e}", path.display()))),
    }
}

/// The host's RAM in MiB, from /proc/meminfo.
pub fn host_mem_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpfile(name: &str, body: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    fn valid() -> VmConfig {
        VmConfig {
            boot_source: BootSource {
                kernel_image_path: tmpfile("kernel", b"k"),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn firecracker_shaped_file_parses() {
        let kernel = tmpfile("k2", b"k");
        let json = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}},
                "machine-config": {{"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "huge_pages": "2M"}},
                "console": "none", "boot_timer": true}}"#,
            kernel.display()
        );
        let p = tmpfile("vm.json", json.as_bytes());
        let c = VmConfig::from_file(&p).unwrap();
        assert_eq!(c.machine.vcpu_count, 2);
        assert_eq!(c.machine.huge_pages, HugePages::Huge2M);
        assert!(c.machine.thp, "thp defaults to on");
        assert_eq!(c.console, ConsoleTarget::None);
        assert!(c.boot_timer);
        assert_eq!(c.boot_args(), "console=ttyS0");
        c.validate(1024).unwrap();
    }

    #[test]
    fn unknown_and_mistyped_fields_are_named() {
        let p = tmpfile(
            "bad.json",
            br#"{"boot-source": {"kernel_image_path": "/k", "bootargs": "x"}}"#,
        );
        let e = VmConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("bootargs") && e.contains("bad.json"), "{e}");
        let p = tmpfile(
            "bad2.json",
            br#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": "two", "mem_size_mib": 1}}"#,
        );
        let e = VmConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("invalid type"), "{e}");
        let e = VmConfig::from_file(Path::new("/nonexistent/vm.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/vm.json"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_refused_by_field() {
        type Mutation = fn(&mut VmConfig);
        let cases: [(Mutation, &str); 7] = [
            (|c| c.machine.vcpu_count = 0, "vcpu_count"),
            (|c| c.machine.vcpu_count = 255, "vcpu_count"),
            (|c| c.machine.mem_size_mib = 0, "mem_size_mib"),
            (|c| c.machine.mem_size_mib = 1 << 40, "mem_size_mib"),
            (
                |c| c.boot_source.boot_args = Some("x".repeat(2048)),
                "boot_args",
            ),
            (
                |c| c.boot_source.initrd_path = Some("/nonexistent/initrd".into()),
                "initrd_path",
            ),
            (
                |c| c.boot_source.kernel_image_path = "/nonexistent/kernel".into(),
                "kernel_image_path",
            ),
        ];
        for (mutate, field) in cases {
            let mut c = valid();
            mutate(&mut c);
            let e = c.validate(4096).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
        valid().validate(4096).unwrap();
        // An unreadable host size (u64::MAX) still cannot let a byte count overflow.
        let mut c = valid();
        c.machine.mem_size_mib = u64::MAX >> 10;
        assert!(c.validate(u64::MAX).is_err());
        let mut c = valid();
        c.machine.vcpu_count = 254;
        c.validate(4096).unwrap();
    }

    #[test]
    fn drive_flag_parsing() {
        let d = DriveConfig::parse_flag("path=/img,id=root,readonly=true,root=on").unwrap();
        assert_eq!(d.path_on_host, PathBuf::from("/img"));
        assert_eq!(d.drive_id, "root");
        assert!(d.is_read_only && d.is_root_device);
        for (bad, needle) in [
            ("id=x", "path= is required"),
            ("path=/img", "id= is required"),
            ("path=/img,id=x,readonly=maybe", "readonly=maybe"),
            ("path=/img,id=x,colour=red", "unknown key"),
        ] {
            let e = DriveConfig::parse_flag(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn drive_validation() {
        let img = tmpfile("disk.img", &[0; 4096]);
        let drive = |id: &str, root: bool| DriveConfig {
            drive_id: id.into(),
            path_on_host: img.clone(),
            is_root_device: root,
            is_read_only: false,
        };
        let mut c = valid();
        c.drives = vec![drive("data", false), drive("root", true)];
        c.validate(4096).unwrap();
        assert_eq!(c.ordered_drives()[0].drive_id, "root");
        for (drives, needle) in [
            (
                vec![drive("a", true), drive("b", true)],
                "more than one root",
            ),
            (vec![drive("a", false), drive("a", false)], "used twice"),
            (vec![drive(&"x".repeat(21), false)], "1 to 20 bytes"),
            (vec![drive("has space", false)], "printable"),
            (vec![drive("a", false); 19], "virtio devices"),
        ] {
            let mut c = valid();
            c.drives = drives;
            let e = c.validate(4096).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let mut c = valid();
        c.drives = vec![DriveConfig {
            path_on_host: "/nonexistent/disk".into(),
            ..drive("a", false)
        }];
        let e = c.validate(4096).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/disk"), "{e}");
    }

    #[test]
    fn net_and_vsock_flags() {
        let n = NetConfig::parse_flag("tap=tap0,mac=06:00:ac:10:00:02,mtu=1400").unwrap();
        assert_eq!(n.iface_id, "tap0");
        assert_eq!(n.mac_bytes().unwrap(), Some([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(n.mtu, Some(1400));
        for bad in ["mac=06:00:ac:10:00:02", "tap=t,mtu=big", "tap=t,speed=10"] {
            assert!(NetConfig::parse_flag(bad).is_err(), "{bad}");
        }
        for mac in [
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "zz:00:ac:10:00:02",
            "07:00:ac:10:00:02",
        ] {
            let n = NetConfig {
                guest_mac: Some(mac.into()),
                ..NetConfig::parse_flag("tap=t").unwrap()
            };
            assert!(n.mac_bytes().is_err(), "{mac}");
        }
        let v = VsockConfig::parse_flag("cid=3,uds=/run/v.sock").unwrap();
        assert_eq!(
            (v.guest_cid, v.uds_path.as_path()),
            (3, Path::new("/run/v.sock"))
        );
        let mut c = valid();
        c.vsock = Some(VsockConfig { guest_cid: 2, ..v });
        assert!(c
            .validate(4096)
            .unwrap_err()
            .to_string()
            .contains("guest_cid"));
        let mut c = valid();
        c.net = vec![
            NetConfig::parse_flag("tap=a,id=x").unwrap(),
            NetConfig::parse_flag("tap=b,id=x").unwrap(),
        ];
        assert!(c
            .validate(4096)
            .unwrap_err()
            .to_string()
            .contains("used twice"));
    }

    #[test]
    fn directory_as_kernel_is_refused() {
        let mut c = valid();
        c.boot_source.kernel_image_path = std::env::temp_dir();
        let e = c.validate(4096).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
