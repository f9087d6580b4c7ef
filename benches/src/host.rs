//! Facts about the machine the harness runs on: whether its KVM can boot Linux, a
//! description for the report, the git commit and the date.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// `Ok(module)` when /dev/kvm is a hardware KVM (kvm_amd or kvm_intel, no kvm_pvm), else
/// why not. kvm-pvm answers the KVM API but cannot boot a stock kernel
/// (../shared/TEST-HOST.md); the same check as `tests::kvm_probe::kvm_kind`.
pub fn genuine_kvm() -> Result<&'static str, String> {
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm does not exist".into());
    }
    if module("kvm_pvm") {
        return Err("/dev/kvm is kvm-pvm, which cannot boot a stock Linux kernel".into());
    }
    ["kvm_amd", "kvm_intel"]
        .into_iter()
        .find(|m| module(m))
        .ok_or_else(|| "neither kvm_amd nor kvm_intel is loaded".into())
}

/// The CPU model from /proc/cpuinfo's `model name`.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == "model name")
        .map(|(_, v)| v.trim().to_string())
}

/// Whether /proc/cpuinfo says this machine is itself a VM (the `hypervisor` flag), so a KVM
/// here is a nested one.
pub fn is_virtual_machine(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim() == "flags")
        .any(|(_, v)| v.split_whitespace().any(|f| f == "hypervisor"))
}

/// Online CPUs.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// "CPU model, N cores", read from this machine.
pub fn describe_cpu() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu_model(&cpuinfo).unwrap_or_else(|| "unknown CPU".into());
    format!("{model}, {} cores", cores())
}

/// The commit checked out in `repo`, with `-dirty` when the work tree differs from it;
/// "unknown" without git.
pub fn git_commit(repo: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
    };
    let Some(out) = git(&["rev-parse", "--short=12", "HEAD"]).filter(|o| o.status.success()) else {
        return "unknown".into();
    };
    let mut id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|o| o.status.success() && !o.stdout.is_empty());
    if dirty {
        id.push_str("-dirty");
    }
    id
}

/// Now, as RFC 3339 UTC to the second.
pub fn now_utc() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339_utc(secs)
}

/// Seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339_utc(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_date(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Gregorian year, month, day of the day `days` after 1970-01-01.
fn civil_date(days: u64) -> (u64, u64, u64) {
    // Count from 0000-03-01 so the leap day ends each 4/100/400-year cycle; 719468 days
    // separate that date from the epoch, and a 400-year era has 146097 days.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months counted from March, each 5-month block being 153 days long.
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_format_as_rfc3339() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(rfc3339_utc(1_735_689_600), "2025-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(4_107_542_400), "2100-03-01T00:00:00Z");
    }

    #[test]
    fn cpuinfo_fields() {
        let text =
            "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu vme hypervisor svm\n";
        assert_eq!(cpu_model(text).as_deref(), Some("AMD EPYC 7B13"));
        assert!(is_virtual_machine(text));
        assert!(!is_virtual_machine("flags\t: fpu vme svm\n"));
        assert_eq!(cpu_model("processor: 0\n"), None);
    }
}
