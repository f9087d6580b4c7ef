//! Fuzzes the control API's request parser (`vmm::api::parse_request`): every byte a client
//! sends over the API socket ends up there, so it sees methods, paths and bodies of any shape.
//!
//! Input layout:
//!   [0]   method selector: `sel % 8` below 7 picks a method from `METHODS` (real ones, ones
//!         no endpoint serves, and a lowercase one); 7 reads the method as a field instead.
//!   then  the method field when selected, then the path field. A field is one length byte
//!         `n` and the next `n` bytes (fewer if the input ends), made a string lossily, as the
//!         HTTP layer only hands over UTF-8.
//!   rest  the body.
//!
//! Checks: no panic; the answer agrees with `allowed_methods` (no endpoint: 404; endpoint
//! without this method: 405 naming the allowed ones; else not 404/405); an error has a
//! client-error status and a non-empty message whose `fault_json` is a JSON object holding
//! exactly that message; a request with a body that was accepted had a JSON object body
//! (only `PUT /entropy` may leave it blank); a drive or interface accepted under a path id
//! names that same id in its body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::{allowed_methods, parse_request, VmmAction};

const METHODS: [&str; 7] = ["GET", "PUT", "PATCH", "POST", "DELETE", "HEAD", "get"];

/// Splits off one length-prefixed field.
fn field(data: &[u8]) -> (String, &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (String::new(), data);
    };
    let (s, rest) = rest.split_at(rest.len().min(usize::from(n)));
    (String::from_utf8_lossy(s).into_owned(), rest)
}

fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

/// The id in `/{prefix}/{id}` (one trailing `/` allowed, as the router allows it).
fn path_id<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(prefix)?;
    Some(rest.strip_suffix('/').unwrap_or(rest))
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let (method, rest) = match METHODS.get(usize::from(sel % 8)) {
        Some(m) => ((*m).to_owned(), rest),
        None => field(rest),
    };
    let (path, body) = field(rest);
    let method = method.as_str();
    let path = path.as_str();

    let result = parse_request(method, path, body);
    let allowed = allowed_methods(path);

    match &result {
        Err(e) => {
            assert!(!e.message.is_empty(), "empty message: {e:?}");
            assert!(
                matches!(e.status, 400 | 404 | 405),
                "the parser only refuses the client: {e:?}"
            );
            let fault: serde_json::Value =
                serde_json::from_str(&e.fault_json()).expect("fault_json is JSON");
            let obj = fault.as_object().expect("fault_json is an object");
            assert_eq!(obj.len(), 1, "{fault}");
            assert_eq!(
                obj.get("fault_message").and_then(|m| m.as_str()),
                Some(e.message.as_str()),
                "{fault}"
            );
        }
        Ok(action) => {
            if method != "GET" {
                let object = serde_json::from_slice::<serde_json::Value>(body)
                    .is_ok_and(|v| v.is_object());
                let blank_entropy =
                    is_blank(body) && matches!(action, VmmAction::PutEntropy(_));
                assert!(
                    object || blank_entropy,
                    "{method} {path:?} accepted a body that is not a JSON object: {action:?}"
                );
            }
            match action {
                VmmAction::PutDrive(d) => {
                    assert_eq!(path_id(path, "/drives/"), Some(d.drive_id.as_str()));
                }
                VmmAction::PutNetworkInterface(n) => {
                    assert_eq!(
                        path_id(path, "/network-interfaces/"),
                        Some(n.iface_id.as_str())
                    );
                }
                _ => {}
            }
        }
    }

    match allowed {
        None => {
            let e = result.as_ref().expect_err("no endpoint, yet accepted");
            assert_eq!(e.status, 404, "{method} {path:?}: {e:?}");
        }
        Some(methods) if !methods.contains(&method) => {
            let e = result.as_ref().expect_err("method not served, yet accepted");
            assert_eq!(e.status, 405, "{method} {path:?}: {e:?}");
            for m in methods {
                assert!(e.message.contains(m), "405 names {m}: {e:?}");
            }
        }
        Some(_) => {
            if let Err(e) = &result {
                assert_eq!(e.status, 400, "{method} {path:?}: {e:?}");
            }
        }
    }
});
