//! Fuzzes the vmstate file loader (`vmm::snapshot::format::decode`) with hostile files.
//!
//! Input layout:
//!   [0]   mode: bit0 clear: the rest is a whole file image (header, payload, checksum);
//!         bit0 set: the rest is a payload, wrapped in a valid header and checksum so the
//!         decoder and the state validation are reached.
//!   [1..] the image or payload.
//!
//! Checks: no panic, no unbounded allocation (libFuzzer's -rss_limit_mb / -malloc_limit_mb),
//! and a state that loads encodes back to an image that loads to the same encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::format::{decode, encode, frame_payload};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        assert!(decode(data, None).is_err());
        return;
    };
    let image = if mode & 1 == 1 {
        frame_payload(rest)
    } else {
        rest.to_vec()
    };
    let expected_mem = (mode & 2 == 2).then_some(u64::from(mode >> 2));
    if let Ok(state) = decode(&image, expected_mem) {
        let again = encode(&state).expect("a decoded state encodes");
        let back = decode(&again, expected_mem).expect("a re-encoded state decodes");
        assert_eq!(encode(&back).expect("encodes"), again, "encoding is stable");
    }
});
