//! IPv4 address types the orchestrator leases and filters with: `Ipv4Cidr` (any prefix,
//! used by the manifest's egress allow-list), `Subnet` (the pool VMs are leased from, /16 to
//! /30) and `Mac` (derived from a VM id so a VM keeps its MAC across restarts).
//!
//! Pure value types: nothing here touches the host network. The lease table lives in
//! `store.rs`; creating bridges, taps and netfilter rules is the daemon's job.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};

/// The lease pool used when the operator configures none: a private (RFC 1918) /24.
pub const DEFAULT_SUBNET: &str = "172.30.0.0/24";

/// Shortest prefix accepted for a lease pool: a /16 holds 65534 hosts, plenty for one node,
/// and keeps the lease scan cheap.
pub const MIN_SUBNET_PREFIX: u8 = 16;
/// Longest prefix accepted for a lease pool: a /30 has two hosts, the bridge and one VM.
pub const MAX_SUBNET_PREFIX: u8 = 30;

/// Errors from parsing an address block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetAddrError {
    /// The text is not `a.b.c.d/len`.
    #[error("{text:?} is not of the form a.b.c.d/len")]
    Syntax {
        /// The text given.
        text: String,
    },
    /// The prefix length is outside what the caller accepts.
    #[error("prefix length /{len} in {text:?} is outside /{min}../{max}")]
    PrefixLength {
        /// The text given.
        text: String,
        /// The prefix length found.
        len: u8,
        /// Smallest length accepted.
        min: u8,
        /// Largest length accepted.
        max: u8,
    },
    /// Bits below the prefix are set, so the block is ambiguous ("10.0.0.1/8").
    #[error("{text:?} has host bits set; the block is {network}/{len}")]
    HostBitsSet {
        /// The text given.
        text: String,
        /// The address with the host bits cleared.
        network: Ipv4Addr,
        /// The prefix length.
        len: u8,
    },
}

/// An IPv4 address block `network/len`, `len` in 0..=32, with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    len: u8,
}

impl Ipv4Cidr {
    /// Builds a block, refusing host bits below the prefix.
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Self, NetAddrError> {
        if len > 32 {
            return Err(NetAddrError::PrefixLength {
                text: format!("{addr}/{len}"),
                len,
                min: 0,
                max: 32,
            });
        }
        let network = Ipv4Addr::from(u32::from(addr) & mask(len));
        if network != addr {
            return Err(NetAddrError::HostBitsSet {
                text: format!("{addr}/{len}"),
                network,
                len,
            });
        }
        Ok(Ipv4Cidr { network, len })
    }

    /// The first address of the block.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// The netmask, e.g. 255.255.255.0 for a /24.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.len))
    }

    /// The last address of the block.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.len))
    }

    /// Whether `ip` lies in the block.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.len) == u32::from(self.network)
    }
}

/// The netmask of a prefix length as a host-order integer. `len` must be at most 32.
fn mask(len: u8) -> u32 {
    // A shift by 32 overflows, so /0 is its own case.
    match len {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n.min(32))),
    }
}

impl FromStr for Ipv4Cidr {
    type Err = NetAddrError;

    /// Parses `a.b.c.d/len`. The prefix length is required: a bare address is refused
    /// rather than read as /32, so an allow-list entry always says how wide it is.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || NetAddrError::Syntax {
            text: text.to_string(),
        };
        let (addr, len) = text.split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        // u8::from_str accepts a leading '+'; a prefix length is plain digits.
        if len.is_empty() || len.len() > 2 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let len: u8 = len.parse().map_err(|_| syntax())?;
        Ipv4Cidr::new(addr, len).map_err(|err| match err {
            NetAddrError::PrefixLength { len, min, max, .. } => NetAddrError::PrefixLength {
                text: text.to_string(),
                len,
                min,
                max,
            },
            NetAddrError::HostBitsSet { network, len, .. } => NetAddrError::HostBitsSet {
                text: text.to_string(),
                network,
                len,
            },
            NetAddrError::Syntax { .. } => syntax(),
        })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// The pool VM addresses are leased from: an `Ipv4Cidr` with a prefix of /16 to /30.
///
/// Layout: the network address and the broadcast address are never leased; the first host
/// address (network + 1) is the host bridge, the VMs' gateway; VMs get network + 2 up to
/// broadcast - 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet(Ipv4Cidr);

impl Subnet {
    /// Wraps a block as a lease pool, checking its prefix length.
    pub fn new(cidr: Ipv4Cidr) -> Result<Self, NetAddrError> {
        let len = cidr.prefix_len();
        if !(MIN_SUBNET_PREFIX..=MAX_SUBNET_PREFIX).contains(&len) {
            return Err(NetAddrError::PrefixLength {
                text: cidr.to_string(),
                len,
                min: MIN_SUBNET_PREFIX,
                max: MAX_SUBNET_PREFIX,
            });
        }
        Ok(Subnet(cidr))
    }

    /// The block.
    pub fn cidr(&self) -> Ipv4Cidr {
        self.0
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.0.network()
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }

    /// The netmask.
    pub fn netmask(&self) -> Ipv4Addr {
        self.0.netmask()
    }

    /// The broadcast address, never leased.
    pub fn broadcast(&self) -> Ipv4Addr {
        self.0.broadcast()
    }

    /// The first host address: the host bridge and the VMs' default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) + 1)
    }

    /// Whether `ip` is an address a VM may be leased (inside, and not the network,
    /// gateway or broadcast address).
    pub fn is_leasable(&self, ip: Ipv4Addr) -> bool {
        let (first, last) = self.lease_bounds();
        (first..=last).contains(&u32::from(ip))
    }

    /// How many addresses can be leased to VMs: 2^(32-len) - 3.
    pub fn lease_capacity(&self) -> u32 {
        let (first, last) = self.lease_bounds();
        last - first + 1
    }

    /// Leasable addresses, lowest first.
    pub fn leasable(&self) -> impl Iterator<Item = Ipv4Addr> {
        let (first, last) = self.lease_bounds();
        (first..=last).map(Ipv4Addr::from)
    }

    /// First and last leasable address as integers. With the prefix at most /30 there are
    /// at least four addresses, so first <= last and nothing overflows.
    fn lease_bounds(&self) -> (u32, u32) {
        (
            u32::from(self.network()) + 2,
            u32::from(self.broadcast()) - 1,
        )
    }
}

impl Default for Subnet {
    /// `DEFAULT_SUBNET`, 172.30.0.0/24.
    fn default() -> Self {
        Subnet(Ipv4Cidr {
            network: Ipv4Addr::new(172, 30, 0, 0),
            len: 24,
        })
    }
}

impl FromStr for Subnet {
    type Err = NetAddrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Subnet::new(text.parse()?).map_err(|err| match err {
            NetAddrError::PrefixLength { len, min, max, .. } => NetAddrError::PrefixLength {
                text: text.to_string(),
                len,
                min,
                max,
            },
            other => other,
        })
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The MAC of the VM with this id: the same id always gives the same MAC, so a
    /// restarted or re-adopted VM keeps it.
    ///
    /// The first octet is 0x06: bit 1 set (the IEEE 802 U/L bit: locally administered, so
    /// it can never clash with a vendor-assigned address) and bit 0 clear (unicast). The
    /// other five octets are the first five bytes of SHA-256("orchestrator-vm-mac\0" || id). Forty
    /// random-looking bits make a clash between two live VMs unlikely (about 5e-7 with 1000
    /// VMs); the store keeps MACs unique, so a clash fails the create instead of sharing an
    /// address.
    pub fn for_vm(vm_id: &str) -> Mac {
        let digest = Sha256::new()
            .chain_update(b"orchestrator-vm-mac\0")
            .chain_update(vm_id.as_bytes())
            .finalize();
        let mut octets = [0x06, 0, 0, 0, 0, 0];
        octets[1..].copy_from_slice(&digest[..5]);
        Mac(octets)
    }

    /// The six octets.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for Mac {
    /// Lower-case, colon-separated: `06:1a:2b:3c:4d:5e`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl FromStr for Mac {
    type Err = NetAddrError;

    /// Parses six colon-separated hex octets.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || NetAddrError::Syntax {
            text: text.to_string(),
        };
        let mut octets = [0u8; 6];
        let mut parts = text.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or_else(syntax)?;
            if part.len() != 2 {
                return Err(syntax());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        Ok(Mac(octets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_and_rejects() {
        let c: Ipv4Cidr = "10.0.0.0/8".parse().unwrap();
        assert_eq!(c.network(), Ipv4Addr::new(10, 0, 0, 0));
        assert_eq!(c.prefix_len(), 8);
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains(Ipv4Addr::new(10, 255, 1, 2)));
        assert!(!c.contains(Ipv4Addr::new(11, 0, 0, 0)));
        assert_eq!(
            "1.2.3.4/32".parse::<Ipv4Cidr>().unwrap().broadcast(),
            Ipv4Addr::new(1, 2, 3, 4)
        );
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(255, 255, 255, 255)));
        assert_eq!(all.netmask(), Ipv4Addr::new(0, 0, 0, 0));

        for bad in [
            "",
            "10.0.0.0",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/08x",
            "10.0.0.0/8/8",
            "a.b.c.d/8",
            " 10.0.0.0/8",
            "10.0.0.0/100",
        ] {
            assert!(
                matches!(bad.parse::<Ipv4Cidr>(), Err(NetAddrError::Syntax { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(
            "10.0.0.0/33".parse::<Ipv4Cidr>(),
            Err(NetAddrError::PrefixLength {
                text: "10.0.0.0/33".into(),
                len: 33,
                min: 0,
                max: 32
            })
        );
        let err = "10.0.0.1/8".parse::<Ipv4Cidr>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"10.0.0.1/8\" has host bits set; the block is 10.0.0.0/8"
        );
    }

    #[test]
    fn subnet_layout() {
        let s: Subnet = "10.1.2.0/24".parse().unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 1, 2, 1));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 1, 2, 255));
        assert_eq!(s.lease_capacity(), 253);
        let all: Vec<_> = s.leasable().collect();
        assert_eq!(all.first(), Some(&Ipv4Addr::new(10, 1, 2, 2)));
        assert_eq!(all.last(), Some(&Ipv4Addr::new(10, 1, 2, 254)));
        assert_eq!(all.len(), 253);
        assert!(!s.is_leasable(Ipv4Addr::new(10, 1, 2, 0)));
        assert!(!s.is_leasable(Ipv4Addr::new(10, 1, 2, 1)));
        assert!(!s.is_leasable(Ipv4Addr::new(10, 1, 2, 255)));
        assert!(!s.is_leasable(Ipv4Addr::new(10, 1, 3, 7)));

        let tiny: Subnet = "192.168.9.4/30".parse().unwrap();
        assert_eq!(tiny.lease_capacity(), 1);
        assert_eq!(
            tiny.leasable().collect::<Vec<_>>(),
            [Ipv4Addr::new(192, 168, 9, 6)]
        );
        let big: Subnet = "10.20.0.0/16".parse().unwrap();
        assert_eq!(big.lease_capacity(), 65533);

        assert_eq!(Subnet::default().to_string(), DEFAULT_SUBNET);
        assert_eq!(DEFAULT_SUBNET.parse::<Subnet>().unwrap(), Subnet::default());
    }

    #[test]
    fn subnet_prefix_bounds() {
        for bad in ["10.0.0.0/15", "10.0.0.0/31", "10.0.0.0/32", "0.0.0.0/0"] {
            let err = bad.parse::<Subnet>().unwrap_err();
            let NetAddrError::PrefixLength { text, min, max, .. } = &err else {
                panic!("{bad}: {err:?}");
            };
            assert_eq!((text.as_str(), *min, *max), (bad, 16, 30));
        }
        assert!(matches!(
            "10.0.0.1/24".parse::<Subnet>(),
            Err(NetAddrError::HostBitsSet { .. })
        ));
    }

    #[test]
    fn mac_is_deterministic_local_unicast() {
        let a = Mac::for_vm("vm-1");
        assert_eq!(a, Mac::for_vm("vm-1"));
        assert_ne!(a, Mac::for_vm("vm-2"));
        assert_eq!(a.octets()[0], 0x06);
        assert_eq!(a.octets()[0] & 0b01, 0, "unicast");
        assert_eq!(a.octets()[0] & 0b10, 0b10, "locally administered");
        let text = a.to_string();
        assert_eq!(text.len(), 17);
        assert!(text.starts_with("06:"));
        assert_eq!(text.parse::<Mac>().unwrap(), a);
        // Different ids give different MACs across a realistic fleet.
        let macs: std::collections::HashSet<_> =
            (0..2000).map(|i| Mac::for_vm(&format!("vm-{i}"))).collect();
        assert_eq!(macs.len(), 2000);
        for bad in [
            "",
            "06:00:00:00:00",
            "06:00:00:00:00:00:00",
            "6:0:0:0:0:0",
            "zz:00:00:00:00:00",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?}");
        }
    }
}
