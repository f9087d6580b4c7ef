//! The harness's outputs: one [`MetricResult`] per catalog metric, gathered in a [`Report`]
//! that becomes `benches/results/*.json`, the table printed on stdout, and a section of
//! `benches/RESULTS.md`.
//!
//! JSON shape (extra fields after `note` are additions to the required shape):
//! `{"commit", "date", "machine", "nested_kvm", "metrics": {NAME: {"unit", "ours", "peer",
//! "peer_name", "ratio", "runs", "note", "better", "ours_min", "ours_p99", "peer_min",
//! "peer_p99", "failures"}}}`, with metrics in catalog order.

use serde::ser::Serializer;
use serde::Serialize;

use crate::metrics::{MetricDef, Status};
use crate::stats::Summary;

/// One metric's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricResult {
    /// Unit of every value.
    pub unit: String,
    /// Our median.
    pub ours: Option<f64>,
    /// The peer's median.
    pub peer: Option<f64>,
    /// What the peer is.
    pub peer_name: String,
    /// ours / peer (medians).
    pub ratio: Option<f64>,
    /// Successful runs per side (the smaller count if they differ; ours alone when the peer
    /// has no samples).
    pub runs: usize,
    /// Method, target, and why a value is missing.
    pub note: String,
    /// "lower" or "higher" is better.
    pub better: String,
    /// Our smallest sample.
    pub ours_min: Option<f64>,
    /// Our 99th percentile.
    pub ours_p99: Option<f64>,
    /// The peer's smallest sample.
    pub peer_min: Option<f64>,
    /// The peer's 99th percentile.
    pub peer_p99: Option<f64>,
    /// Runs (both sides together) that failed.
    pub failures: usize,
}

/// Rounds to 3 decimals so the JSON stays readable.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl MetricResult {
    /// A metric that is not measured: by status (not implemented yet) or because this run
    /// left it out (`--only`), with `why`.
    pub fn missing(def: &MetricDef, why: &str) -> MetricResult {
        MetricResult {
            unit: def.unit.into(),
            ours: None,
            peer: None,
            peer_name: def.peer_name.into(),
            ratio: None,
            runs: 0,
            note: why.into(),
            better: def.better.as_str().into(),
            ours_min: None,
            ours_p99: None,
            peer_min: None,
            peer_p99: None,
            failures: 0,
        }
    }

    /// A metric from each side's samples. `method` opens the note; the target and its
    /// outcome, and any failures (`first_error` being the first), follow.
    pub fn measured(
        def: &MetricDef,
        method: &str,
        ours: &[f64],
        peer: &[f64],
        failures: usize,
        first_error: Option<&str>,
    ) -> MetricResult {
        let o = Summary::of(ours);
        let p = Summary::of(peer);
        let ratio = match (o, p) {
            (Some(o), Some(p)) if p.median > 0.0 => Some(o.median / p.median),
            _ => None,
        };
        let mut note = method.to_string();
        if let Some(t) = def.target {
            note.push_str("; ");
            note.push_str(t.text);
            match t.met(o.map(|s| s.median), ratio) {
                Some(true) => note.push_str(": met"),
                Some(false) => note.push_str(": NOT met"),
                None => note.push_str(": unknown"),
            }
        }
        if failures > 0 {
            note.push_str(&format!("; {failures} run(s) FAILED"));
            if let Some(e) = first_error {
                note.push_str(&format!(" (first: {e})"));
            }
        }
        let r = |x: Option<f64>| x.map(round3);
        MetricResult {
            unit: def.unit.into(),
            ours: r(o.map(|s| s.median)),
            peer: r(p.map(|s| s.median)),
            peer_name: def.peer_name.into(),
            ratio: r(ratio),
            // Runs per side; a metric without a peer counts our runs.
            runs: match p {
                Some(p) => o.map_or(0, |s| s.n).min(p.n),
                None => o.map_or(0, |s| s.n),
            },
            note,
            better: def.better.as_str().into(),
            ours_min: r(o.map(|s| s.min)),
            ours_p99: r(o.map(|s| s.p99)),
            peer_min: r(p.map(|s| s.min)),
            peer_p99: r(p.map(|s| s.p99)),
            failures,
        }
    }

    /// A metric whose value is the p99 of `ours`, samples another metric of the same run
    /// made (a p50 and a p99 from one set of runs): as [`MetricResult::measured`] with no
    /// peer, `ours` being the p99.
    pub fn p99_of(
        def: &MetricDef,
        method: &str,
        ours: &[f64],
        failures: usize,
        first_error: Option<&str>,
    ) -> MetricResult {
        let mut m = MetricResult::measured(def, method, ours, &[], failures, first_error);
        m.ours = m.ours_p99;
        m
    }
}

/// One harness run's results.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Git commit of the tree measured (with `-dirty` when it had changes).
    pub commit: String,
    /// UTC time the run started, RFC 3339.
    pub date: String,
    /// CPU model, cores, and where the VMs ran.
    pub machine: String,
    /// Whether the VMs ran on a nested (L1) KVM.
    pub nested_kvm: bool,
    /// Every catalog metric, in catalog order.
    #[serde(serialize_with = "in_order")]
    pub metrics: Vec<(String, MetricResult)>,
}

fn in_order<S: Serializer>(metrics: &[(String, MetricResult)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(metrics.iter().map(|(k, v)| (k, v)))
}

impl Report {
    /// Fills in every catalog metric: `measured` where given, otherwise missing with the
    /// catalog's reason or, for a measurable metric this run skipped, `skipped_note`.
    pub fn new(
        commit: String,
        date: String,
        machine: String,
        nested_kvm: bool,
        catalog: &[MetricDef],
        mut measured: Vec<(String, MetricResult)>,
        skipped_note: &str,
    ) -> Report {
        let metrics = catalog
            .iter()
            .map(|def| {
                let found = measured.iter().position(|(n, _)| n == def.name);
                let result = match (found, def.status) {
                    (Some(i), _) => measured.swap_remove(i).1,
                    (None, Status::NotYet(why)) => MetricResult::missing(def, why),
                    (None, Status::Measured) => MetricResult::missing(def, skipped_note),
                };
                (def.name.to_string(), result)
            })
            .collect();
        Report {
            commit,
            date,
            machine,
            nested_kvm,
            metrics,
        }
    }

    /// Pretty JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        s.push('\n');
        s
    }

    /// The results as a Markdown table with padded columns, readable as plain text too.
    pub fn table(&self) -> String {
        let header = [
            "metric", "unit", "ours", "ours min", "ours p99", "peer", "peer min", "peer p99",
            "ratio", "runs", "note",
        ];
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
        for (name, m) in &self.metrics {
            rows.push(vec![
                name.clone(),
                m.unit.clone(),
                num(m.ours),
                num(m.ours_min),
                num(m.ours_p99),
                num(m.peer),
                num(m.peer_min),
                num(m.peer_p99),
                m.ratio.map_or("-".into(), |r| format!("{r:.3}")),
                m.runs.to_string(),
                m.note.replace('|', "/"),
            ]);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let line = |cells: &[String]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .enumerate()
                // The note, last, is not padded: trailing spaces would only add noise.
                .map(|(c, (s, &w))| {
                    if c + 1 == widths.len() {
                        s.clone()
                    } else {
                        format!("{s:<w$}")
                    }
                })
                .collect();
            format!("| {} |\n", padded.join(" | "))
        };
        let mut out = line(&rows[0]);
        let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w.max(3))).collect();
        out.push_str(&format!("|-{}-|\n", rule.join("-|-")));
        for r in &rows[1..] {
            out.push_str(&line(r));
        }
        out
    }
}

/// A value for the table: `-` when missing, fewer decimals as it grows.
pub fn num(x: Option<f64>) -> String {
    match x {
        None => "-".into(),
        Some(v) if v.abs() >= 1000.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// The fixed top of `benches/RESULTS.md`; sections go below [`SECTIONS_MARKER`].
pub const RESULTS_HEADER: &str = "\
# Benchmark results

Written by the benchmark harness (`scripts/bench.sh`; see README.md in this directory), one
section per full run, newest first. Each section names the commit, the machine and the date.
`ours` and `peer` are medians; `ratio` is ours / peer (medians of the same test host run).
Absolute times inside the nested test host are slow and noisy: compare ratios.
";

/// The line after which the newest section is inserted.
pub const SECTIONS_MARKER: &str = "<!-- bench: sections below, newest first -->";

/// Renders one run's section of RESULTS.md; `extra` lines join the list under the title.
pub fn results_section(report: &Report, runs: usize, command: &str, extra: &[String]) -> String {
    let extra: String = extra.iter().map(|l| format!("- {l}\n")).collect();
    format!(
        "## {date}, commit {commit}\n\n\
         - Machine: {machine}; nested KVM: {nested}\n\
         - Runs: {runs} per side, ours and the peer alternating; command: `{command}`\n\
         {extra}\n\
         {table}",
        date = report.date,
        commit = report.commit,
        machine = report.machine,
        nested = if report.nested_kvm { "yes" } else { "no" },
        table = report.table(),
    )
}

/// Puts `section` at the top of the sections of `existing` (the file's current text, if
/// any), below the fixed header, keeping every older section after it.
pub fn insert_section(existing: Option<&str>, section: &str) -> String {
    let section = section.trim_end();
    let head = format!("{}\n{SECTIONS_MARKER}\n", RESULTS_HEADER.trim_end());
    let older = match existing {
        None => "",
        Some(text) => match text.find(SECTIONS_MARKER) {
            Some(at) => &text[at + SECTIONS_MARKER.len()..],
            // No marker (edited by hand): keep the whole text below the new section.
            None => text,
        },
    };
    let older = older.trim();
    if older.is_empty() {
        format!("{head}\n{section}\n")
    } else {
        format!("{head}\n{section}\n\n{older}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{find, CATALOG};

    fn sample_report() -> Report {
        let boot = find("boot_ready_ms_1vcpu").unwrap();
        let measured = vec![(
            boot.name.to_string(),
            MetricResult::measured(
                boot,
                "spawn to ready",
                &[100.0, 120.0, 110.0],
                &[1000.0, 1100.0, 900.0],
                0,
                None,
            ),
        )];
        Report::new(
            "abc123".into(),
            "2026-11-22T05:00:00Z".into(),
            "AMD EPYC, 2 cores".into(),
            true,
            CATALOG,
            measured,
            "not run: left out by --only",
        )
    }

    #[test]
    fn json_has_the_required_shape_and_every_metric_in_order() {
        let report = sample_report();
        let v: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        let top = v.as_object().unwrap();
        for key in ["commit", "date", "machine", "nested_kvm", "metrics"] {
            assert!(top.contains_key(key), "missing {key}");
        }
        assert_eq!(v["nested_kvm"], serde_json::Value::Bool(true));
        let metrics = v["metrics"].as_object().unwrap();
        assert_eq!(metrics.len(), CATALOG.len());
        for def in CATALOG {
            let m = &metrics[def.name];
            for key in ["unit", "ours", "peer", "peer_name", "ratio", "runs", "note"] {
                assert!(m.get(key).is_some(), "{}: missing {key}", def.name);
            }
            assert!(m["runs"].is_u64());
            assert!(m["note"].is_string() && m["unit"].is_string());
        }
        let boot = &metrics["boot_ready_ms_1vcpu"];
        assert_eq!(boot["ours"], 110.0);
        assert_eq!(boot["peer"], 1000.0);
        assert_eq!(boot["ratio"], 0.11);
        assert_eq!(boot["runs"], 3);
        assert!(boot["note"].as_str().unwrap().contains(": met"));
        let rss = &metrics["vmm_rss_overhead_mib"];
        assert!(rss["ours"].is_null());
        assert_eq!(rss["note"], "not run: left out by --only");
        let template = &metrics["orch_create_exec_ms_template_p50"];
        assert!(template["ours"].is_null() && template["ratio"].is_null());
        assert_eq!(template["note"], "not run: left out by --only");
        // Measured but left out by --only: null with the skip note, not n/a.
        let cold = &metrics["orch_create_exec_ms_cold_p50"];
        assert!(cold["ours"].is_null());
        assert_eq!(cold["note"], "not run: left out by --only");
        // Catalog order, not alphabetical: the text lists boot before api.
        let text = report.to_json();
        assert!(text.find("boot_ready_ms_2vcpu").unwrap() < text.find("api_ready_ms").unwrap());
    }

    #[test]
    fn a_metric_not_measurable_yet_is_null_with_its_reason() {
        let catalog = [MetricDef {
            status: Status::NotYet("n/a: not implemented yet"),
            ..*find("wake_exec_ms").unwrap()
        }];
        let r = Report::new(
            "c".into(),
            "d".into(),
            "m".into(),
            false,
            &catalog,
            Vec::new(),
            "not run: left out by --only",
        );
        let (name, m) = &r.metrics[0];
        assert_eq!(name, "wake_exec_ms");
        assert_eq!((m.ours, m.ratio, m.runs), (None, None, 0));
        assert_eq!(m.note, "n/a: not implemented yet");
    }

    #[test]
    fn a_p99_metric_reports_the_p99_of_the_samples_as_ours() {
        let def = find("orch_create_exec_ms_template_p99").unwrap();
        let samples: Vec<f64> = (1..=20).map(f64::from).collect();
        let m = MetricResult::p99_of(def, "p99 of the p50's runs", &samples, 1, Some("boom"));
        // 0.99 * 19 = 18.81: 19 + 0.81 * (20 - 19)
        assert_eq!(m.ours, Some(19.81));
        assert_eq!(m.ours_p99, Some(19.81));
        assert_eq!(m.ours_min, Some(1.0));
        assert_eq!((m.peer, m.ratio, m.runs, m.failures), (None, None, 20, 1));
        assert!(
            m.note.starts_with("p99 of the p50's runs; 1 run(s) FAILED"),
            "{}",
            m.note
        );
        let p50 = MetricResult::measured(
            find("orch_create_exec_ms_template_p50").unwrap(),
            "",
            &samples,
            &[],
            0,
            None,
        );
        assert_eq!((p50.ours, p50.ours_p99), (Some(10.5), Some(19.81)));
    }

    #[test]
    fn failures_and_missing_sides_show_in_the_note() {
        let def = find("vmm_rss_overhead_mib").unwrap();
        let m = MetricResult::measured(def, "rss", &[6.0], &[], 1, Some("timeout"));
        assert_eq!(m.ours, Some(6.0));
        assert_eq!(m.peer, None);
        assert_eq!(m.ratio, None);
        // No peer samples: the runs are ours.
        assert_eq!(m.runs, 1);
        assert!(m.note.contains("NOT met"), "{}", m.note);
        assert!(
            m.note.contains("1 run(s) FAILED (first: timeout)"),
            "{}",
            m.note
        );
    }

    #[test]
    fn table_lists_every_metric_with_dashes_for_missing_values() {
        let t = sample_report().table();
        assert_eq!(t.lines().count(), CATALOG.len() + 2);
        let boot = t
            .lines()
            .find(|l| l.contains("boot_ready_ms_1vcpu"))
            .unwrap();
        assert!(
            boot.contains("| 110.0 ") && boot.contains("| 0.110 "),
            "{boot}"
        );
        let blk = t.lines().find(|l| l.contains("blk_randread_iops")).unwrap();
        assert!(blk.contains("| -  "), "{blk}");
        assert_eq!(num(Some(1234.56)), "1235");
        assert_eq!(num(Some(1.23456)), "1.23");
        assert_eq!(num(Some(42.04)), "42.0");
    }

    #[test]
    fn sections_go_on_top_below_the_header_keeping_older_ones() {
        let first = insert_section(None, "## run 1\n\ntable 1\n");
        assert!(first.starts_with("# Benchmark results"));
        assert!(first.contains(SECTIONS_MARKER));
        assert!(first.ends_with("## run 1\n\ntable 1\n"));
        let second = insert_section(Some(&first), "## run 2\n\ntable 2");
        let (one, two) = (
            second.find("## run 1").unwrap(),
            second.find("## run 2").unwrap(),
        );
        assert!(two < one, "newest first:\n{second}");
        assert!(second.find(SECTIONS_MARKER).unwrap() < two);
        assert_eq!(second.matches("# Benchmark results").count(), 1);
        let third = insert_section(Some(&second), "## run 3");
        let order: Vec<usize> = ["## run 3", "## run 2", "## run 1"]
            .iter()
            .map(|s| third.find(s).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{third}");
        // A file without the marker keeps its text below the new section.
        let odd = insert_section(Some("hand-written notes\n"), "## run 9");
        assert!(odd.find("## run 9").unwrap() < odd.find("hand-written notes").unwrap());
    }

    #[test]
    fn section_is_stamped_with_date_machine_and_commit() {
        let s = results_section(&sample_report(), 3, "scripts/bench.sh --runs 3", &[]);
        assert!(
            s.starts_with("## 2026-11-22T05:00:00Z, commit abc123\n"),
            "{s}"
        );
        assert!(
            s.contains("Machine: AMD EPYC, 2 cores; nested KVM: yes"),
            "{s}"
        );
        assert!(s.contains("| boot_ready_ms_1vcpu "), "{s}");
        assert!(
            s.contains("command: `scripts/bench.sh --runs 3`\n\n| metric"),
            "{s}"
        );
        let s = results_section(
            &sample_report(),
            3,
            "bench",
            &["Test host sessions: 2".into()],
        );
        assert!(
            s.contains("`bench`\n- Test host sessions: 2\n\n| metric"),
            "{s}"
        );
    }
}
