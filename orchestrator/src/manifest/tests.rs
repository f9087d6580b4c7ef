use serde_json::json;

use super::*;

/// A complete, valid manifest.
fn full() -> Value {
    json!({
        "schema": 1,
        "name": "web-1",
        "kernel": "/srv/img/vmlinux",
        "initrd": "/srv/img/initrd",
        "rootfs": { "path": "/srv/img/rootfs.ext4", "read_only": false },
        "vcpus": 2,
        "memory_mib": 256,
        "entrypoint": "/usr/bin/server",
        "args": ["--port", "8080"],
        "env": { "RUST_LOG": "info", "_X1": "" },
        "working_dir": "/srv",
        "agent_port": 1024,
        "network": { "enabled": true, "egress_allow": ["10.0.0.0/8", "1.2.3.4/32"] },
        "limits": {
            "memory_max_mib": 300,
            "cpu_quota_pct": 150,
            "pids_max": 64,
            "open_files": 1024
        },
        "idle_hibernate_s": 600
    })
}

/// Only the required fields.
fn minimal() -> Value {
    json!({
        "schema": 1,
        "name": "a",
        "kernel": "/k",
        "rootfs": { "path": "/r" },
        "entrypoint": "sh"
    })
}

fn parse(value: &Value) -> Result<Manifest, ManifestErrors> {
    Manifest::parse(value.to_string().as_bytes())
}

/// `base` with the value at JSON pointer `pointer` replaced (or inserted) by `new`.
fn with(mut base: Value, pointer: &str, new: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let target = base.pointer_mut(parent).unwrap();
    match target {
        Value::Object(map) => {
            map.insert(key.to_string(), new);
        }
        Value::Array(items) => items[key.parse::<usize>().unwrap()] = new,
        _ => panic!("{parent} is not a container"),
    }
    base
}

fn without(mut base: Value, pointer: &str) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    base.pointer_mut(parent)
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove(key);
    base
}

/// Asserts the document fails with exactly one problem, at `path`, whose reason contains
/// `needle`.
#[track_caller]
fn assert_one_error(doc: &Value, path: &str, needle: &str) {
    let errors = parse(doc).expect_err("manifest should be refused");
    assert_eq!(
        errors.errors().len(),
        1,
        "expected one problem at {path}, got {errors}"
    );
    let e = &errors.errors()[0];
    assert_eq!(e.path, path, "{errors}");
    assert!(
        e.reason.contains(needle),
        "reason {:?} lacks {needle:?}",
        e.reason
    );
}

#[test]
fn full_manifest_parses() {
    let m = parse(&full()).unwrap();
    assert_eq!(m.name, "web-1");
    assert_eq!(m.kernel, PathBuf::from("/srv/img/vmlinux"));
    assert_eq!(m.initrd, Some(PathBuf::from("/srv/img/initrd")));
    assert_eq!(
        m.rootfs,
        Rootfs {
            path: "/srv/img/rootfs.ext4".into(),
            read_only: false
        }
    );
    assert_eq!((m.vcpus, m.memory_mib), (2, 256));
    assert_eq!(m.entrypoint, "/usr/bin/server");
    assert_eq!(m.args, ["--port", "8080"]);
    assert_eq!(m.env.get("RUST_LOG").map(String::as_str), Some("info"));
    assert_eq!(m.working_dir, "/srv");
    assert_eq!(m.agent_port, 1024);
    assert!(m.network.enabled);
    assert_eq!(
        m.network.egress_allow,
        [
            "10.0.0.0/8".parse::<Ipv4Cidr>().unwrap(),
            "1.2.3.4/32".parse().unwrap()
        ]
    );
    assert_eq!(
        m.limits,
        Limits {
            memory_max_mib: Some(300),
            cpu_quota_pct: Some(150),
            pids_max: Some(64),
            open_files: Some(1024)
        }
    );
    assert_eq!(m.idle_hibernate_s, Some(600));
}

#[test]
fn defaults_fill_in() {
    let m = parse(&minimal()).unwrap();
    assert_eq!(m.initrd, None);
    assert!(m.rootfs.read_only);
    assert_eq!(m.vcpus, DEFAULT_VCPUS);
    assert_eq!(m.memory_mib, DEFAULT_MEMORY_MIB);
    assert!(m.args.is_empty() && m.env.is_empty());
    assert_eq!(m.working_dir, "/");
    assert_eq!(m.agent_port, DEFAULT_AGENT_PORT);
    assert!(m.network.enabled);
    assert!(m.network.egress_allow.is_empty());
    assert_eq!(m.limits, Limits::default());
    assert_eq!(m.idle_hibernate_s, None);
    // Explicit nulls read as absent.
    let nulls = with(
        with(minimal(), "/initrd", Value::Null),
        "/limits",
        Value::Null,
    );
    assert_eq!(parse(&nulls).unwrap(), m);
}

#[test]
fn every_bad_value_names_its_field() {
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("/schema", json!(2), "schema", "not supported"),
        ("/name", json!(""), "name", "1 to 63"),
        ("/name", json!("Web"), "name", "a-z"),
        ("/name", json!("-web"), "name", "not starting"),
        ("/name", json!("a".repeat(64)), "name", "1 to 63"),
        ("/name", json!("a_b"), "name", "a-z"),
        ("/kernel", json!("vmlinux"), "kernel", "absolute"),
        ("/kernel", json!("/a\u{0}b"), "kernel", "NUL"),
        (
            "/kernel",
            json!(format!("/{}", "k".repeat(4096))),
            "kernel",
            "more than 4096",
        ),
        ("/initrd", json!("initrd.img"), "initrd", "absolute"),
        (
            "/rootfs/path",
            json!("rootfs.ext4"),
            "rootfs.path",
            "absolute",
        ),
        ("/vcpus", json!(0), "vcpus", "1..=32"),
        ("/vcpus", json!(33), "vcpus", "1..=32"),
        ("/memory_mib", json!(63), "memory_mib", "64..=65536"),
        ("/memory_mib", json!(65537), "memory_mib", "64..=65536"),
        ("/entrypoint", json!(""), "entrypoint", "empty"),
        ("/args/1", json!("a\u{0}"), "args[1]", "NUL"),
        (
            "/args/0",
            json!("x".repeat(MAX_ARG_BYTES + 1)),
            "args[0]",
            "more than",
        ),
        (
            "/env/1BAD",
            json!("v"),
            "env.1BAD",
            "not a valid variable name",
        ),
        (
            "/env/A-B",
            json!("v"),
            "env.A-B",
            "not a valid variable name",
        ),
        (
            "/env/",
            json!("v"),
            "env.[\"\"]",
            "not a valid variable name",
        ),
        ("/env/OK", json!("a\u{0}"), "env.OK", "NUL"),
        (
            "/env/BIG",
            json!("x".repeat(MAX_ARG_BYTES)),
            "env.BIG",
            "more than",
        ),
        ("/working_dir", json!("srv"), "working_dir", "absolute"),
        ("/agent_port", json!(0), "agent_port", "1..=4294967294"),
        (
            "/agent_port",
            json!(u64::from(u32::MAX)),
            "agent_port",
            "1..=4294967294",
        ),
        (
            "/network/egress_allow/1",
            json!("1.2.3.4"),
            "network.egress_allow[1]",
            "a.b.c.d/len",
        ),
        (
            "/network/egress_allow/0",
            json!("10.0.0.1/8"),
            "network.egress_allow[0]",
            "host bits",
        ),
        (
            "/network/egress_allow/0",
            json!("10.0.0.0/33"),
            "network.egress_allow[0]",
            "/33",
        ),
        (
            "/limits/memory_max_mib",
            json!(271),
            "limits.memory_max_mib",
            "memory_mib (256) + 16",
        ),
        (
            "/limits/memory_max_mib",
            json!(MAX_MEMORY_MAX_MIB + 1),
            "limits.memory_max_mib",
            "more than",
        ),
        (
            "/limits/cpu_quota_pct",
            json!(0),
            "limits.cpu_quota_pct",
            "1..=3200",
        ),
        (
            "/limits/cpu_quota_pct",
            json!(3201),
            "limits.cpu_quota_pct",
            "1..=3200",
        ),
        (
            "/limits/pids_max",
            json!(15),
            "limits.pids_max",
            "16..=65536",
        ),
        (
            "/limits/pids_max",
            json!(65537),
            "limits.pids_max",
            "16..=65536",
        ),
        (
            "/limits/open_files",
            json!(15),
            "limits.open_files",
            "16..=1048576",
        ),
        (
            "/limits/open_files",
            json!(2_000_000),
            "limits.open_files",
            "16..=1048576",
        ),
        (
            "/idle_hibernate_s",
            json!(0),
            "idle_hibernate_s",
            "at least 1",
        ),
    ];
    for (pointer, value, path, needle) in cases {
        let doc = with(full(), pointer, value);
        let errors = parse(&doc).expect_err(pointer);
        assert_eq!(errors.errors().len(), 1, "{pointer}: {errors}");
        let e = &errors.errors()[0];
        assert_eq!(e.path, path, "{pointer}: {errors}");
        assert!(
            e.reason.contains(needle),
            "{pointer}: {:?} lacks {needle:?}",
            e.reason
        );
    }
    // Exactly at the bounds is fine.
    for (pointer, value) in [
        ("/vcpus", json!(32)),
        ("/memory_mib", json!(64)),
        ("/limits/memory_max_mib", json!(272)),
        ("/agent_port", json!(u32::MAX - 1)),
        ("/name", json!("a".repeat(63))),
        ("/args/0", json!("x".repeat(MAX_ARG_BYTES))),
        ("/limits/pids_max", json!(16)),
    ] {
        parse(&with(full(), pointer, value)).unwrap_or_else(|e| panic!("{pointer}: {e}"));
    }
}

#[test]
fn missing_required_fields_are_all_reported() {
    let errors = parse(&json!({})).unwrap_err();
    let paths: Vec<_> = errors.errors().iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["schema", "name", "kernel", "rootfs", "entrypoint"]);
    assert!(errors.errors().iter().all(|e| e.reason.contains("missing")));
    assert_one_error(
        &without(minimal(), "/rootfs/path"),
        "rootfs.path",
        "missing",
    );
}

#[test]
fn wrong_types_give_the_path() {
    let cases = [
        ("/vcpus", json!("two"), "vcpus"),
        ("/vcpus", json!(-1), "vcpus"),
        ("/vcpus", json!(1.5), "vcpus"),
        ("/rootfs/read_only", json!("yes"), "rootfs.read_only"),
        ("/rootfs", json!("/r"), "rootfs"),
        ("/rootfs", json!(["/r", true]), "rootfs"),
        ("/args", json!("a b"), "args"),
        ("/args/1", json!(8080), "args[1]"),
        ("/env/RUST_LOG", json!(1), "env.RUST_LOG"),
        ("/env", json!(["A=1"]), "env"),
        ("/network/enabled", json!(1), "network.enabled"),
        (
            "/network/egress_allow/1",
            json!({}),
            "network.egress_allow[1]",
        ),
        ("/limits", json!([1]), "limits"),
        ("/limits/pids_max", json!("64"), "limits.pids_max"),
        ("/idle_hibernate_s", json!(true), "idle_hibernate_s"),
        ("/schema", json!("1"), "schema"),
    ];
    for (pointer, value, path) in cases {
        let errors = parse(&with(full(), pointer, value)).expect_err(pointer);
        assert_eq!(errors.errors().len(), 1, "{pointer}: {errors}");
        assert_eq!(errors.errors()[0].path, path, "{pointer}: {errors}");
    }
    assert_one_error(&json!([1, "a"]), "", "expected a JSON object");
    assert_one_error(&json!("manifest"), "", "expected a JSON object");
}

#[test]
fn unknown_fields_are_refused_with_their_path() {
    assert_one_error(
        &with(full(), "/kernal", json!("/k")),
        "kernal",
        "unknown field",
    );
    assert_one_error(
        &with(full(), "/rootfs/size", json!(1)),
        "rootfs.size",
        "unknown field",
    );
    assert_one_error(
        &with(full(), "/network/ingress", json!([])),
        "network.ingress",
        "unknown field",
    );
    assert_one_error(
        &with(full(), "/limits/cpu", json!(1)),
        "limits.cpu",
        "unknown field",
    );
}

#[test]
fn syntax_errors_and_repeats() {
    for text in [
        "",
        "{",
        r#"{"schema": 1,}"#,
        r#"{"schema": 1} {}"#,
        "\u{feff}{}",
    ] {
        let errors = Manifest::parse(text.as_bytes()).unwrap_err();
        assert_eq!(errors.errors()[0].path, "", "{text:?}");
        assert!(
            errors.errors()[0].reason.contains("not valid JSON"),
            "{text:?}: {errors}"
        );
    }
    let repeated_env = r#"{"schema":1,"name":"a","kernel":"/k","rootfs":{"path":"/r"},
        "entrypoint":"sh","env":{"A":"1","A":"2"}}"#;
    let errors = Manifest::parse(repeated_env.as_bytes()).unwrap_err();
    assert_eq!(errors.errors()[0].path, "env");
    assert!(
        errors.errors()[0].reason.contains("duplicate key \"A\""),
        "{errors}"
    );
    let repeated_field = r#"{"schema":1,"name":"a","name":"b","kernel":"/k",
        "rootfs":{"path":"/r"},"entrypoint":"sh"}"#;
    let errors = Manifest::parse(repeated_field.as_bytes()).unwrap_err();
    assert!(
        errors.errors()[0].reason.contains("duplicate field"),
        "{errors}"
    );
}

#[test]
fn oversized_manifest_is_refused_before_parsing() {
    // Not even JSON: only the size check can explain the error.
    let junk = vec![b'x'; MAX_MANIFEST_BYTES + 1];
    let errors = Manifest::parse(&junk).unwrap_err();
    assert_eq!(errors.errors().len(), 1);
    assert_eq!(errors.errors()[0].path, "");
    assert!(
        errors.errors()[0]
            .reason
            .contains("1048577 bytes, more than the 1048576"),
        "{errors}"
    );
    // A valid document just over the limit is refused the same way.
    let mut doc = minimal();
    let mut big = doc.to_string().len();
    let mut i = 0;
    while big <= MAX_MANIFEST_BYTES {
        let value = "v".repeat(100_000);
        big += value.len() + 16;
        doc["env"][format!("K{i}")] = json!(value);
        i += 1;
    }
    let text = doc.to_string();
    assert!(text.len() > MAX_MANIFEST_BYTES);
    assert!(Manifest::parse(text.as_bytes()).unwrap_err().errors()[0]
        .reason
        .contains("more than the 1048576 allowed"));
}

#[test]
fn large_manifests_work() {
    // 64 KiB+ in one env value and near the 1 MiB limit in total.
    let mut doc = minimal();
    doc["env"] = json!({ "BIG": "b".repeat(100 * 1024) });
    doc["args"] = json!((0..9)
        .map(|i| format!("{i}").repeat(100_000))
        .collect::<Vec<_>>());
    let text = doc.to_string();
    assert!(
        text.len() > 960 * 1024 && text.len() <= MAX_MANIFEST_BYTES,
        "{}",
        text.len()
    );
    let m = Manifest::parse(text.as_bytes()).unwrap();
    assert_eq!(m.env["BIG"].len(), 100 * 1024);
    assert_eq!(m.args.len(), 9);
    assert_eq!(Manifest::parse(m.canonical_json().as_bytes()).unwrap(), m);
}

#[test]
fn multiple_problems_are_reported_at_once() {
    let mut doc = full();
    doc["name"] = json!("Bad Name");
    doc["vcpus"] = json!(99);
    doc["rootfs"]["path"] = json!("relative");
    doc["args"] = json!(["ok", "nul\u{0}"]);
    doc["network"]["egress_allow"] = json!(["10.0.0.0/8", "nonsense"]);
    doc["limits"]["pids_max"] = json!(1);
    let errors = parse(&doc).unwrap_err();
    let paths: Vec<_> = errors.errors().iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "name",
            "rootfs.path",
            "vcpus",
            "args[1]",
            "network.egress_allow[1]",
            "limits.pids_max"
        ]
    );
    assert!(errors.to_string().starts_with("invalid manifest: name: "));
    // The list is bounded; the rest are counted.
    let mut doc = minimal();
    doc["args"] = json!(vec!["\u{0}"; 100]);
    let errors = parse(&doc).unwrap_err();
    assert_eq!(errors.errors().len(), MAX_REPORTED_ERRORS + 1);
    assert_eq!(
        errors.errors().last().unwrap().reason,
        format!("and {} more problems", 100 - MAX_REPORTED_ERRORS)
    );
    // And serialises for an API body.
    let body = serde_json::to_value(&errors).unwrap();
    assert_eq!(body[0]["path"], "args[0]");
}

#[test]
fn egress_needs_network() {
    let doc = with(full(), "/network/enabled", json!(false));
    assert_one_error(&doc, "network.egress_allow", "network.enabled is false");
    let doc = with(doc, "/network/egress_allow", json!([]));
    assert!(!parse(&doc).unwrap().network.enabled);
}

#[test]
fn count_bounds() {
    let mut doc = minimal();
    doc["args"] = json!(vec!["a"; MAX_ARGS + 1]);
    assert_one_error(&doc, "args", "more than 4096");
    let mut doc = minimal();
    doc["network"] = json!({ "egress_allow": vec!["10.0.0.0/8"; MAX_EGRESS_RULES + 1] });
    assert_one_error(&doc, "network.egress_allow", "more than 256");
    let mut doc = minimal();
    let env: Map<String, Value> = (0..=MAX_ENV_VARS)
        .map(|i| (format!("V{i}"), json!("")))
        .collect();
    doc["env"] = Value::Object(env);
    assert_one_error(&doc, "env", "more than 4096");
}

#[test]
fn canonical_json_and_hash_are_stable() {
    let m = parse(&full()).unwrap();
    // Same manifest, different key order and spacing, defaults written out or not.
    let reordered = r#"{ "limits": {"open_files":1024,"pids_max":64,"cpu_quota_pct":150,
        "memory_max_mib":300}, "idle_hibernate_s":600,
        "network":{"egress_allow":["10.0.0.0/8","1.2.3.4/32"],"enabled":true},
        "agent_port":1024,"working_dir":"/srv","env":{"_X1":"","RUST_LOG":"info"},
        "args":["--port","8080"],"entrypoint":"/usr/bin/server","memory_mib":256,"vcpus":2,
        "rootfs":{"read_only":false,"path":"/srv/img/rootfs.ext4"},
        "initrd":"/srv/img/initrd","kernel":"/srv/img/vmlinux","name":"web-1","schema":1 }"#;
    let m2 = Manifest::parse(reordered.as_bytes()).unwrap();
    assert_eq!(m, m2);
    assert_eq!(m.canonical_json(), m2.canonical_json());
    assert_eq!(m.content_hash(), m2.content_hash());
    let hash = m.content_hash();
    assert_eq!(hash.len(), 64);
    assert!(hash
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));

    // Keys come out sorted and compact.
    let canonical = parse(&minimal()).unwrap().canonical_json();
    assert!(canonical.starts_with(r#"{"agent_port":52,"args":[],"entrypoint":"sh","env":{},"#));
    assert!(!canonical.contains(' '));
    // Writing a default explicitly does not change the hash.
    let explicit = with(minimal(), "/memory_mib", json!(DEFAULT_MEMORY_MIB));
    assert_eq!(
        parse(&explicit).unwrap().content_hash(),
        parse(&minimal()).unwrap().content_hash()
    );
    // Any change does.
    let other = with(full(), "/args/1", json!("8081"));
    assert_ne!(parse(&other).unwrap().content_hash(), hash);
    // Round trip through the canonical form and through Serialize.
    assert_eq!(Manifest::parse(m.canonical_json().as_bytes()).unwrap(), m);
    assert_eq!(serde_json::to_value(&m).unwrap(), m.to_value());
}

#[test]
fn check_files_reports_each_missing_file() {
    let dir = std::env::temp_dir().join(format!("manifest-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"k").unwrap();
    let mut doc = minimal();
    doc["kernel"] = json!(kernel);
    doc["initrd"] = json!(dir.join("absent"));
    doc["rootfs"]["path"] = json!(dir);
    let m = parse(&doc).unwrap();
    let errors = m.check_files().unwrap_err();
    let paths: Vec<_> = errors.errors().iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["initrd", "rootfs.path"]);
    assert!(errors.errors()[0].reason.contains("does not exist"));
    assert!(errors.errors()[1].reason.contains("is a directory"));

    let rootfs = dir.join("rootfs.ext4");
    std::fs::write(&rootfs, b"r").unwrap();
    let mut m = m;
    m.initrd = None;
    m.rootfs.path = rootfs;
    m.check_files().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn documented_example_parses() {
    let doc = include_str!("../../docs/manifest.md");
    let (_, rest) = doc.split_once("```json\n").unwrap();
    let (example, _) = rest.split_once("```").unwrap();
    let m = Manifest::parse(example.as_bytes()).unwrap();
    assert_eq!(m.name, "api-worker");
    assert_eq!(m.agent_port, DEFAULT_AGENT_PORT);
    assert_eq!(m.limits.memory_max_mib, Some(640));
}
