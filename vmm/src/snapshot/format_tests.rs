//! vmstate file tests: round trip, every refusal with its message, crash-safe writing.

use std::path::Path;

use vmm_sys_util::tempdir::TempDir;

use super::*;
use crate::snapshot::test_utils::sample_state;

fn image() -> Vec<u8> {
    encode(&sample_state()).unwrap()
}

/// Recomputes the checksum after editing an image.
fn reseal(mut b: Vec<u8>) -> Vec<u8> {
    let n = b.len() - TRAILER_LEN;
    let crc = CRC64.checksum(&b[..n]);
    b[n..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// An image with `payload` as the payload, valid header and checksum.
fn with_payload(payload: &[u8]) -> Vec<u8> {
    frame_payload(payload)
}

fn load_err(dir: &Path, name: &str, bytes: &[u8], mem: Option<u64>) -> (FormatError, String) {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let e = load(&path, mem).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    (e.problem().cloned().unwrap(), msg)
}

#[test]
fn round_trip_through_a_file() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("vmstate");
    let size = save(&path, &sample_state()).unwrap();
    assert_eq!(size, std::fs::metadata(&path).unwrap().len());
    assert!(
        !tmp_path(&path).exists(),
        "the temporary file is renamed away"
    );
    let back = load(&path, Some(2)).unwrap();
    assert_eq!(
        encode(&back).unwrap(),
        image(),
        "what is read re-encodes identically"
    );
    assert_eq!(back.vcpus[0].regs.rax, 42);
    assert_eq!(back.vcpus[0].xsave.as_ref().unwrap().region[0], 0x37f);
    assert_eq!(
        back.devices.virtio[0].device.queues().unwrap()[0].next_avail,
        7
    );
    // The encoding is compact: a vCPU is dominated by its 4 KiB XSAVE and 1 KiB LAPIC.
    assert!(size < 8 * 1024, "{size} bytes");
}

#[test]
fn saving_replaces_an_existing_file_whole() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("vmstate");
    std::fs::write(&path, vec![0xaa; 100_000]).unwrap();
    save(&path, &sample_state()).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), image());
}

#[test]
fn each_corruption_is_refused_with_its_own_message() {
    let dir = TempDir::new().unwrap();
    let d = dir.as_path();
    let good = image();

    let (p, m) = load_err(d, "short", &good[..10], None);
    assert_eq!(p, FormatError::TruncatedHeader { len: 10 });
    assert!(m.contains("truncated"), "{m}");
    let (p, _) = load_err(d, "empty", &[], None);
    assert_eq!(p, FormatError::TruncatedHeader { len: 0 });

    let mut b = good.clone();
    b[0] = b'X';
    let (p, m) = load_err(d, "magic", &b, None);
    assert!(matches!(p, FormatError::BadMagic { .. }));
    assert!(m.contains("not a vmstate file"), "{m}");

    let mut b = good.clone();
    b[8..12].copy_from_slice(&7u32.to_le_bytes());
    let (p, m) = load_err(d, "version", &reseal(b), None);
    assert_eq!(p, FormatError::Version { found: 7 });
    assert!(
        m.contains("version 7") && m.contains("supports version 1"),
        "{m}"
    );

    let (p, m) = load_err(d, "cut", &good[..good.len() - 1], None);
    assert!(matches!(p, FormatError::TruncatedPayload { .. }), "{p:?}");
    assert!(m.contains("truncated"), "{m}");
    let (p, _) = load_err(d, "headonly", &good[..HEADER_LEN], None);
    assert!(matches!(
        p,
        FormatError::TruncatedPayload { available: 0, .. }
    ));

    let mut b = good.clone();
    b.push(0);
    let (p, _) = load_err(d, "trailing", &b, None);
    assert_eq!(p, FormatError::TrailingBytes { extra: 1 });

    let mut b = good.clone();
    b[HEADER_LEN + 3] ^= 1;
    let (p, m) = load_err(d, "crc", &b, None);
    assert!(matches!(p, FormatError::Checksum { .. }));
    assert!(m.contains("checksum"), "{m}");

    let (p, m) = load_err(d, "garbage", &with_payload(&[0xff; 64]), None);
    assert!(matches!(p, FormatError::Decode(_)), "{p:?}");
    assert!(m.contains("does not decode"), "{m}");

    let mut state = sample_state();
    state.machine.vcpu_count = 3;
    let (p, m) = load_err(d, "invalid", &encode(&state).unwrap(), None);
    assert!(matches!(p, FormatError::Invalid(_)), "{p:?}");
    assert!(m.contains("vcpu_count is 3"), "{m}");

    let (p, m) = load_err(d, "mem", &good, Some(512));
    assert_eq!(
        p,
        FormatError::MemorySize {
            found: 2,
            expected: 512
        }
    );
    assert!(m.contains("2 MiB") && m.contains("512 MiB"), "{m}");
}

#[test]
fn a_huge_stated_payload_is_refused_before_reading() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("huge");
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    // A sparse 1 GiB file: would take a second to read and 1 GiB to hold.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let e = load(&path, None).unwrap_err();
    assert_eq!(
        e.problem(),
        Some(&FormatError::TooLarge { stated: u64::MAX })
    );
    // Same for a stated length within the cap but longer than the file.
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&MAX_PAYLOAD.to_le_bytes());
    let e = decode(&b, None).unwrap_err();
    assert!(matches!(e, FormatError::TruncatedPayload { .. }));
}

#[test]
fn a_missing_file_names_itself() {
    let e = load(Path::new("/nonexistent/vmstate"), None).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/vmstate"), "{e}");
    assert!(e.problem().is_none());
}

#[test]
fn hostile_lengths_inside_the_payload_do_not_allocate() {
    // A postcard sequence length of 2^63 (varint) where the vCPU list starts: decoding must
    // fail on the missing input, not try to reserve the memory.
    let mut payload = postcard::to_allocvec(&sample_state().machine).unwrap();
    // KvmVmState: no irqchip, no PIT, an empty (zero-padded) clock.
    payload.extend_from_slice(&[0, 0, 0]);
    payload.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    let Err(FormatError::Decode(why)) = decode(&with_payload(&payload), None) else {
        panic!("must not decode");
    };
    assert!(why.contains("end"), "fails on the missing input: {why}");
}

/// With `VMSTATE_SEED_DIR` set, writes the sample image there (the fuzz corpus seed).
#[test]
fn write_fuzz_seed_if_asked() {
    if let Some(dir) = std::env::var_os("VMSTATE_SEED_DIR") {
        let dir = Path::new(&dir);
        // The fuzz target's first byte is a mode: 0 = the rest is a whole image, bit 0 set
        // = the rest is a payload to wrap in a valid header and checksum.
        let mut whole = vec![0u8];
        whole.extend_from_slice(&image());
        std::fs::write(dir.join("sample"), whole).unwrap();
        let mut wrapped = vec![1u8];
        wrapped.extend_from_slice(&image()[HEADER_LEN..image().len() - TRAILER_LEN]);
        std::fs::write(dir.join("sample-payload"), wrapped).unwrap();
    }
}
