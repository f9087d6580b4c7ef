//! The catalog of metrics the harness reports, in the order of the "Benchmark harness"
//! issue. Every metric appears in every report; one that cannot be measured yet carries
//! `ours: null` and a note naming what is missing.

/// Whether smaller or larger values are better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Times, memory.
    Lower,
    /// Throughputs, rates.
    Higher,
}

impl Better {
    /// "lower" or "higher".
    pub fn as_str(self) -> &'static str {
        match self {
            Better::Lower => "lower",
            Better::Higher => "higher",
        }
    }
}

/// How a metric is measured today.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The harness measures it.
    Measured,
    /// Not measurable yet; the note says why.
    NotYet(&'static str),
}

/// A target from the issue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    /// How the note states it.
    pub text: &'static str,
    /// What is checked.
    pub check: TargetCheck,
}

/// What a [`Target`] compares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TargetCheck {
    /// ours_median / peer_median at most this.
    RatioAtMost(f64),
    /// ours_median at most this, in the metric's unit.
    OursAtMost(f64),
    /// ours_median / peer_median at least this (throughput).
    RatioAtLeast(f64),
    /// Both: the ratio at most the first, and ours_median at most the second.
    RatioAtMostAndOursAtMost(f64, f64),
}

impl Target {
    /// Whether the target is met, when both needed values are there.
    pub fn met(&self, ours: Option<f64>, ratio: Option<f64>) -> Option<bool> {
        match self.check {
            TargetCheck::RatioAtMost(max) => ratio.map(|r| r <= max),
            TargetCheck::OursAtMost(max) => ours.map(|o| o <= max),
            TargetCheck::RatioAtLeast(min) => ratio.map(|r| r >= min),
            TargetCheck::RatioAtMostAndOursAtMost(max_ratio, max_ours) => {
                match (ratio, ours) {
                    (Some(r), Some(o)) => Some(r <= max_ratio && o <= max_ours),
                    // Either bound already failing settles it.
                    (Some(r), _) if r > max_ratio => Some(false),
                    (_, Some(o)) if o > max_ours => Some(false),
                    _ => None,
                }
            }
        }
    }
}

/// One metric of the catalog.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    /// Name used in the JSON and on the command line (`--only`).
    pub name: &'static str,
    /// Unit of the values.
    pub unit: &'static str,
    /// Direction of "better".
    pub better: Better,
    /// The peer it is compared with.
    pub peer_name: &'static str,
    /// The issue's target, quoted in the note and checked against the result.
    pub target: Option<Target>,
    /// Whether the harness can measure it yet.
    pub status: Status,
}

/// The peer for VMM-level metrics.
pub const QEMU_MICROVM: &str = "qemu-system-x86_64 -M microvm";

/// The vsock metric's comparison: qemu's vsock needs vhost-vsock, which the test host lacks,
/// so it is compared with our own virtio-net (guest to host TCP) in the same run.
pub const VSOCK_PEER: &str = "our virtio-net, guest->host TCP, same run (qemu's vsock needs vhost-vsock, absent in the test host)";
/// The API metric's peer: qemu's control socket.
pub const QMP_PEER: &str = "qemu-system-x86_64 -M microvm -S, QMP greeting on its unix socket";
/// The snapshot metrics' peer: qemu's migration to and from a file.
pub const QEMU_MIGRATE: &str =
    "qemu-system-x86_64 -M microvm: stop + migrate to exec:cat > FILE; -incoming defer + migrate-incoming from exec:cat FILE";
/// restore_exec's peer: none in the test host.
pub const NO_AGENT_PEER: &str =
    "none: qemu microvm has no guest agent path in the test host (its vsock needs vhost-vsock); compare restore_running_ms_128m";
/// The orchestrator metrics' peer: none.
pub const NO_ORCH_PEER: &str =
    "none: no Firecracker-based orchestrator (or other) runs in the test host to compare with; ours only";

const fn def(
    name: &'static str,
    unit: &'static str,
    better: Better,
    target: Option<Target>,
    status: Status,
) -> MetricDef {
    MetricDef {
        name,
        unit,
        better,
        peer_name: QEMU_MICROVM,
        target,
        status,
    }
}

use Better::{Higher, Lower};
use Status::Measured;

/// The boot metrics' target.
const BOOT_TARGET: Target = Target {
    text: "target ratio <= 0.20x qemu microvm (Firecracker measured 0.24x in this setup)",
    check: TargetCheck::RatioAtMost(0.2),
};

/// The block throughput target.
const BLK_TARGET: Target = Target {
    text: "target ratio >= 1.0x qemu microvm's virtio-blk",
    check: TargetCheck::RatioAtLeast(1.0),
};

/// The network throughput target.
const NET_TARGET: Target = Target {
    text: "target ratio >= 1.0x qemu microvm's virtio-net",
    check: TargetCheck::RatioAtLeast(1.0),
};

/// Snapshot create's target (issue 6).
const SNAPSHOT_TARGET: Target = Target {
    text: "target ratio <= 0.5x qemu's migrate-to-file (Firecracker measured 1.18 s at 128 MiB, 6.19 s at 1 GiB in this setup)",
    check: TargetCheck::RatioAtMost(0.5),
};

/// Restore-to-running's target (issue 6).
const RESTORE_TARGET: Target = Target {
    text: "target ratio <= 0.1x qemu's incoming-from-file, and below 200 ms (Firecracker measured 400 ms at 128 MiB, 450 ms at 1 GiB in this setup)",
    check: TargetCheck::RatioAtMostAndOursAtMost(0.1, 200.0),
};

/// The memory overhead's target.
const RSS_TARGET: Target = Target {
    text: "target <= 5 MiB for ours",
    check: TargetCheck::OursAtMost(5.0),
};

/// Every metric, in report order.
pub const CATALOG: &[MetricDef] = &[
    def(
        "boot_ready_ms_1vcpu",
        "ms",
        Lower,
        Some(BOOT_TARGET),
        Measured,
    ),
    def(
        "boot_ready_ms_2vcpu",
        "ms",
        Lower,
        Some(BOOT_TARGET),
        Measured,
    ),
    MetricDef {
        peer_name: QMP_PEER,
        ..def("api_ready_ms", "ms", Lower, None, Measured)
    },
    def(
        "vmm_rss_overhead_mib",
        "MiB",
        Lower,
        Some(RSS_TARGET),
        Measured,
    ),
    def(
        "blk_seq_read_mibs",
        "MiB/s",
        Higher,
        Some(BLK_TARGET),
        Measured,
    ),
    def(
        "blk_seq_write_mibs",
        "MiB/s",
        Higher,
        Some(BLK_TARGET),
        Measured,
    ),
    def(
        "blk_randread_iops",
        "IOPS",
        Higher,
        Some(BLK_TARGET),
        Measured,
    ),
    def(
        "net_tcp_host_to_guest_gbps",
        "Gbit/s",
        Higher,
        Some(NET_TARGET),
        Measured,
    ),
    def(
        "net_tcp_guest_to_host_gbps",
        "Gbit/s",
        Higher,
        Some(NET_TARGET),
        Measured,
    ),
    MetricDef {
        peer_name: VSOCK_PEER,
        ..def("vsock_stream_mibs", "MiB/s", Higher, None, Measured)
    },
    MetricDef {
        peer_name: QEMU_MIGRATE,
        ..def(
            "snapshot_create_s_per_gib",
            "s/GiB",
            Lower,
            Some(SNAPSHOT_TARGET),
            Measured,
        )
    },
    MetricDef {
        peer_name: QEMU_MIGRATE,
        ..def(
            "restore_running_ms_128m",
            "ms",
            Lower,
            Some(RESTORE_TARGET),
            Measured,
        )
    },
    MetricDef {
        peer_name: QEMU_MIGRATE,
        ..def(
            "restore_running_ms_1g",
            "ms",
            Lower,
            Some(RESTORE_TARGET),
            Measured,
        )
    },
    MetricDef {
        peer_name: NO_AGENT_PEER,
        ..def("restore_exec_ms_128m", "ms", Lower, None, Measured)
    },
    MetricDef {
        peer_name: NO_ORCH_PEER,
        ..def("orch_create_exec_ms_cold_p50", "ms", Lower, None, Measured)
    },
    MetricDef {
        peer_name: NO_ORCH_PEER,
        ..def(
            "orch_create_exec_ms_template_p50",
            "ms",
            Lower,
            None,
            Measured,
        )
    },
    MetricDef {
        peer_name: NO_ORCH_PEER,
        ..def(
            "orch_create_exec_ms_template_p99",
            "ms",
            Lower,
            None,
            Measured,
        )
    },
    MetricDef {
        peer_name: NO_ORCH_PEER,
        ..def("orch_creates_per_s", "creates/s", Higher, None, Measured)
    },
    MetricDef {
        peer_name: NO_ORCH_PEER,
        ..def("hibernate_s_per_gib", "s/GiB", Lower, None, Measured)
    },
    MetricDef {
        peer_name: NO_ORCH_PEER,
        ..def("wake_exec_ms", "ms", Lower, None, Measured)
    },
    MetricDef {
        peer_name: NO_ORCH_PEER,
        ..def("idle_templated_vm_host_mib", "MiB", Lower, None, Measured)
    },
];

/// Looks a metric up by name.
pub fn find(name: &str) -> Option<&'static MetricDef> {
    CATALOG.iter().find(|m| m.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_has_the_issues_metrics_once_each() {
        let names: Vec<&str> = CATALOG.iter().map(|m| m.name).collect();
        assert_eq!(names.len(), 21);
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "duplicate metric name");
        for m in CATALOG {
            if let Status::NotYet(note) = m.status {
                assert!(note.starts_with("n/a: "), "{}: {note}", m.name);
            }
        }
        assert!(find("boot_ready_ms_1vcpu").is_some());
        for name in [
            "orch_create_exec_ms_cold_p50",
            "orch_create_exec_ms_template_p50",
            "orch_create_exec_ms_template_p99",
            "orch_creates_per_s",
            "hibernate_s_per_gib",
            "wake_exec_ms",
            "idle_templated_vm_host_mib",
        ] {
            let m = find(name).unwrap();
            assert_eq!(m.status, Status::Measured, "{name}");
            assert!(m.peer_name.starts_with("none: "), "{name}");
        }
        assert_eq!(find("orch_creates_per_s").unwrap().better, Better::Higher);
        assert_eq!(find("hibernate_s_per_gib").unwrap().unit, "s/GiB");
        assert_eq!(find("idle_templated_vm_host_mib").unwrap().unit, "MiB");
        assert!(find("nope").is_none());
    }

    #[test]
    fn targets_check_the_right_value() {
        assert_eq!(BOOT_TARGET.met(Some(100.0), Some(0.19)), Some(true));
        assert_eq!(BOOT_TARGET.met(Some(100.0), Some(0.21)), Some(false));
        assert_eq!(BOOT_TARGET.met(Some(100.0), None), None);
        assert_eq!(RSS_TARGET.met(Some(4.9), None), Some(true));
        assert_eq!(RSS_TARGET.met(Some(5.1), Some(0.1)), Some(false));
        assert_eq!(RESTORE_TARGET.met(Some(150.0), Some(0.05)), Some(true));
        assert_eq!(RESTORE_TARGET.met(Some(250.0), Some(0.05)), Some(false));
        assert_eq!(RESTORE_TARGET.met(Some(150.0), Some(0.2)), Some(false));
        assert_eq!(RESTORE_TARGET.met(Some(150.0), None), None);
        assert_eq!(RESTORE_TARGET.met(Some(250.0), None), Some(false));
    }
}
