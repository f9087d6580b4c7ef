//! Arbitrary bytes as a manifest (`POST /v1/manifests`): `Manifest::parse` must accept or
//! refuse with at least one field error, never panic; an accepted manifest must survive its
//! own canonical form (parse it again to the same manifest and hash).

#![no_main]

use libfuzzer_sys::fuzz_target;
use orchestrator::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    match Manifest::parse(data) {
        Ok(m) => {
            let again = Manifest::parse(m.canonical_json().as_bytes())
                .expect("a manifest's canonical form parses");
            assert_eq!(again, m);
            assert_eq!(again.content_hash(), m.content_hash());
        }
        Err(e) => assert!(!e.errors().is_empty()),
    }
});
