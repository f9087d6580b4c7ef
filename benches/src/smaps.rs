//! Reads `/proc/PID/smaps` and splits a VMM's resident memory into guest RAM and the VMM's
//! own overhead; also reads the `Pss:` of `/proc/PID/smaps_rollup` and the `MemAvailable:`
//! of `/proc/meminfo` (for the idle templated VMs).
//!
//! Both VMMs back guest RAM with one anonymous private mapping of exactly the guest's size
//! (ours through vm-memory's `MmapRegion`, qemu through its anonymous RAM block), so the
//! guest part is found by size. Should a VMM ever split that mapping into adjacent pieces
//! (an `madvise` on part of it splits the VMA), a run of adjacent anonymous mappings adding
//! up to exactly the guest size is accepted too. Overhead = the process's total Rss minus the
//! guest mapping's Rss: the VMM's code, libraries, heap, stacks and device buffers.

use anyhow::{bail, Context, Result};

/// One mapping from smaps: its header line and the two sizes the harness needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Permissions, e.g. `rw-p`.
    pub perms: String,
    /// Inode of the backing file; 0 for anonymous memory.
    pub inode: u64,
    /// Path or pseudo-name (`[heap]`, `[stack]`); empty for plain anonymous memory.
    pub path: String,
    /// `Size:` in KiB.
    pub size_kib: u64,
    /// `Rss:` in KiB.
    pub rss_kib: u64,
}

impl Mapping {
    /// Anonymous memory not given a pseudo-name by the kernel (`[heap]`, `[stack]`, ...).
    /// Names set with `PR_SET_VMA_ANON_NAME` (`[anon:...]`) still count as anonymous.
    pub fn is_plain_anonymous(&self) -> bool {
        self.inode == 0 && (self.path.is_empty() || self.path.starts_with("[anon:"))
    }
}

/// Parses the text of an smaps file.
pub fn parse(text: &str) -> Result<Vec<Mapping>> {
    let mut maps: Vec<Mapping> = Vec::new();
    for (no, line) in text.lines().enumerate() {
        if let Some(m) = parse_header(line) {
            maps.push(m);
            continue;
        }
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let is_size = match key {
            "Size" => true,
            "Rss" => false,
            _ => continue,
        };
        let kib = parse_kib(rest).with_context(|| format!("smaps line {}: {line:?}", no + 1))?;
        let Some(current) = maps.last_mut() else {
            bail!("smaps line {}: field before any mapping: {line:?}", no + 1);
        };
        if is_size {
            current.size_kib = kib;
        } else {
            current.rss_kib = kib;
        }
    }
    Ok(maps)
}

fn parse_kib(rest: &str) -> Result<u64> {
    let mut words = rest.split_whitespace();
    let n = words.next().context("no value")?;
    if words.next() != Some("kB") {
        bail!("value not in kB");
    }
    n.parse().context("not a number")
}

/// `start-end perms offset dev inode [path]`, or `None` for a field line.
fn parse_header(line: &str) -> Option<Mapping> {
    let mut words = line.split_whitespace();
    let (start, end) = words.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = words.next()?.to_string();
    let _offset = words.next()?;
    let dev = words.next()?;
    if !dev.contains(':') {
        return None;
    }
    let inode = words.next()?.parse().ok()?;
    let path = words.collect::<Vec<_>>().join(" ");
    Some(Mapping {
        start,
        end,
        perms,
        inode,
        path,
        size_kib: 0,
        rss_kib: 0,
    })
}

/// Resident memory of a VMM process, split into guest RAM and the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overhead {
    /// Sum of every mapping's Rss.
    pub total_rss_kib: u64,
    /// Rss of the guest RAM mapping(s).
    pub guest_rss_kib: u64,
}

impl Overhead {
    /// Everything resident that is not guest RAM, in KiB.
    pub fn overhead_kib(&self) -> u64 {
        self.total_rss_kib.saturating_sub(self.guest_rss_kib)
    }

    /// The overhead in MiB.
    pub fn overhead_mib(&self) -> f64 {
        self.overhead_kib() as f64 / 1024.0
    }
}

/// Indices of the mapping(s) holding guest RAM of `guest_kib`: one plain anonymous mapping of
/// exactly that size, else a run of adjacent plain anonymous mappings adding up to it, else
/// the smallest plain anonymous mapping at most 64 MiB larger (the kernel merges the guest's
/// mapping with an adjacent anonymous one of the same flags, e.g. a thread's heap arena).
pub fn guest_ram(maps: &[Mapping], guest_kib: u64) -> Option<Vec<usize>> {
    let exact: Vec<usize> = (0..maps.len())
        .filter(|&i| maps[i].is_plain_anonymous() && maps[i].size_kib == guest_kib)
        .collect();
    if let [one] = exact.as_slice() {
        return Some(vec![*one]);
    }
    if exact.len() > 1 {
        // Two candidates of the guest's size: the guest's is the one it has touched most.
        return exact
            .into_iter()
            .max_by_key(|&i| maps[i].rss_kib)
            .map(|i| vec![i]);
    }
    for first in 0..maps.len() {
        let mut total = 0;
        let mut run = Vec::new();
        for (i, m) in maps.iter().enumerate().skip(first) {
            let adjacent = run
                .last()
                .is_none_or(|&prev: &usize| maps[prev].end == m.start);
            if !m.is_plain_anonymous() || !adjacent || total + m.size_kib > guest_kib {
                break;
            }
            total += m.size_kib;
            run.push(i);
            if total == guest_kib {
                return Some(run);
            }
        }
    }
    (0..maps.len())
        .filter(|&i| {
            let size = maps[i].size_kib;
            maps[i].is_plain_anonymous() && size > guest_kib && size <= guest_kib + 65536
        })
        .min_by_key(|&i| maps[i].size_kib)
        .map(|i| vec![i])
}

/// Splits the smaps text of a VMM with `guest_mib` of guest RAM into guest and overhead.
pub fn overhead(text: &str, guest_mib: u64) -> Result<Overhead> {
    let maps = parse(text)?;
    let guest_kib = guest_mib * 1024;
    let Some(guest) = guest_ram(&maps, guest_kib) else {
        let mut anon: Vec<&Mapping> = maps.iter().filter(|m| m.is_plain_anonymous()).collect();
        anon.sort_by_key(|m| std::cmp::Reverse(m.size_kib));
        let largest: Vec<String> = anon
            .iter()
            .take(5)
            .map(|m| format!("{:x}-{:x} {} kB", m.start, m.end, m.size_kib))
            .collect();
        bail!(
            "no anonymous mapping of the guest's {guest_kib} kB among {} mappings; largest anonymous: {}",
            maps.len(),
            largest.join(", ")
        );
    };
    Ok(Overhead {
        total_rss_kib: maps.iter().map(|m| m.rss_kib).sum(),
        guest_rss_kib: guest.iter().map(|&i| maps[i].rss_kib).sum(),
    })
}

/// Reads `/proc/PID/smaps` and splits it as [`overhead`] does.
pub fn overhead_of_pid(pid: u32, guest_mib: u64) -> Result<Overhead> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    overhead(&text, guest_mib).with_context(|| format!("in {path}"))
}

/// The value of the `KEY:` line (in kB) of a /proc file such as smaps_rollup or meminfo.
pub fn kib_field(text: &str, key: &str) -> Result<u64> {
    let line = text
        .lines()
        .find(|l| l.split_once(':').is_some_and(|(k, _)| k.trim() == key))
        .with_context(|| format!("no {key}: line"))?;
    let rest = line.split_once(':').map_or("", |(_, r)| r);
    parse_kib(rest).with_context(|| format!("{line:?}"))
}

/// The proportional set size of a process, in KiB, from its `/proc/PID/smaps_rollup`: its
/// private pages plus its share of pages mapped by several processes (a template's memory
/// file mapped by every VM restored from it counts once in all).
pub fn rollup_pss_kib(text: &str) -> Result<u64> {
    kib_field(text, "Pss")
}

/// `MemAvailable:` of `/proc/meminfo`, in KiB.
pub fn mem_available_kib(text: &str) -> Result<u64> {
    kib_field(text, "MemAvailable")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An abridged smaps of a VMM with 128 MiB of guest RAM.
    const SAMPLE: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234                       /usr/bin/vmm
Size:               1024 kB
KernelPageSize:        4 kB
Rss:                 800 kB
Pss:                 800 kB
VmFlags: rd ex mr mw me dw
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                  64 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0008000000 rw-p 00000000 00:00 0 
Size:             131072 kB
Rss:               40000 kB
VmFlags: rd wr mr mw me nr
7f0008000000-7f0008200000 rw-p 00000000 00:00 0 
Size:               2048 kB
Rss:                  12 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  20 kB
";

    #[test]
    fn parses_headers_and_sizes() {
        let maps = parse(SAMPLE).unwrap();
        assert_eq!(maps.len(), 5);
        assert_eq!(maps[0].path, "/usr/bin/vmm");
        assert_eq!(maps[0].inode, 1234);
        assert_eq!((maps[0].size_kib, maps[0].rss_kib), (1024, 800));
        assert_eq!(maps[1].path, "[heap]");
        assert!(!maps[1].is_plain_anonymous());
        assert!(maps[2].is_plain_anonymous());
        assert_eq!(maps[2].start, 0x7f00_0000_0000);
        assert_eq!(maps[2].end, 0x7f00_0800_0000);
        assert_eq!(maps[2].size_kib, 131_072);
    }

    #[test]
    fn overhead_is_total_minus_guest_mapping() {
        let o = overhead(SAMPLE, 128).unwrap();
        assert_eq!(o.total_rss_kib, 800 + 64 + 40_000 + 12 + 20);
        assert_eq!(o.guest_rss_kib, 40_000);
        assert_eq!(o.overhead_kib(), 896);
        assert!((o.overhead_mib() - 0.875).abs() < 1e-9);
    }

    #[test]
    fn missing_guest_mapping_is_an_error_naming_the_candidates() {
        let err = overhead(SAMPLE, 256).unwrap_err().to_string();
        assert!(err.contains("262144 kB"), "{err}");
        assert!(err.contains("131072 kB"), "{err}");
    }

    #[test]
    fn split_guest_mapping_is_found_as_an_adjacent_run() {
        let text = "\
7f0000000000-7f0004000000 rw-p 00000000 00:00 0
Size:              65536 kB
Rss:                1000 kB
7f0004000000-7f0008000000 rw-p 00000000 00:00 0
Size:              65536 kB
Rss:                2000 kB
7f0009000000-7f0009001000 rw-p 00000000 00:00 0
Size:                  4 kB
Rss:                   4 kB
";
        let maps = parse(text).unwrap();
        assert_eq!(guest_ram(&maps, 131_072), Some(vec![0, 1]));
        let o = overhead(text, 128).unwrap();
        assert_eq!((o.guest_rss_kib, o.overhead_kib()), (3000, 4));
        // Not adjacent: no run.
        assert_eq!(guest_ram(&maps, 65_536 + 4), None);
    }

    #[test]
    fn guest_mapping_merged_with_a_neighbour_is_the_smallest_slightly_larger_one() {
        let text = "\
7f0000000000-7f0008800000 rw-p 00000000 00:00 0
Size:             139264 kB
Rss:               30000 kB
7f1000000000-7f1010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:                 100 kB
";
        let maps = parse(text).unwrap();
        assert_eq!(guest_ram(&maps, 131_072), Some(vec![0]));
        // More than 64 MiB larger is some other mapping, not the guest's.
        assert_eq!(guest_ram(&maps, 65_536), None);
    }

    #[test]
    fn malformed_field_is_reported_with_its_line() {
        let err = parse("7f00-7f01 rw-p 0 00:00 0\nRss: lots kB\n").unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
        assert!(parse("Rss: 4 kB\n").is_err());
    }

    #[test]
    fn rollup_pss_and_mem_available_are_read_in_kib() {
        let rollup = "\
55d0c0000000-7ffd00021000 ---p 00000000 00:00 0                          [rollup]
Rss:               42000 kB
Pss:               12345 kB
Pss_Anon:           2000 kB
Pss_File:          10345 kB
";
        assert_eq!(rollup_pss_kib(rollup).unwrap(), 12_345);
        let meminfo = "MemTotal:       10240000 kB\nMemFree:         9000000 kB\nMemAvailable:    9500000 kB\n";
        assert_eq!(mem_available_kib(meminfo).unwrap(), 9_500_000);
        let e = mem_available_kib("MemTotal: 1 kB\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "no MemAvailable: line");
        assert!(rollup_pss_kib("Pss: many kB\n").is_err());
    }
}
