//! Unit tests of the virtio-mmio transport against a dummy device.

use super::*;
use crate::virtio::test_utils::mem;
use crate::virtio::{DeviceCommon, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER};

const FEATURE_X: u64 = 1 << 3;

struct Dummy {
    common: DeviceCommon,
    config_writes: Vec<(u64, Vec<u8>)>,
    activated: Option<Vec<Queue>>,
    fail_activate: bool,
    resets: u32,
}

impl Dummy {
    fn new(max: &[u16]) -> Dummy {
        Dummy {
            common: DeviceCommon::new(
                crate::virtio::TYPE_RNG,
                feature(VIRTIO_F_VERSION_1) | FEATURE_X,
                max,
                (1..=8).collect(),
            )
            .unwrap(),
            config_writes: vec![],
            activated: None,
            fail_activate: false,
            resets: 0,
        }
    }
}

impl VirtioDevice for Dummy {
    fn common(&self) -> &DeviceCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut DeviceCommon {
        &mut self.common
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config_writes.push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        _interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::AlreadyActivated);
        }
        self.activated = Some(queues);
        Ok(())
    }
    fn reset(&mut self) {
        self.activated = None;
        self.common.reset();
        self.resets += 1;
    }
    fn is_activated(&self) -> bool {
        self.activated.is_some()
    }
}

struct Rig {
    t: MmioTransport,
    dev: Arc<Mutex<Dummy>>,
    irq: EventFd,
}

fn rig_with(max: &[u16]) -> Rig {
    let dev = Arc::new(Mutex::new(Dummy::new(max)));
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let t = MmioTransport::new(dev.clone(), mem(), irq.try_clone().unwrap()).unwrap();
    Rig { t, dev, irq }
}

fn rig() -> Rig {
    rig_with(&[16, 8])
}

impl Rig {
    fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }
    fn driver_features(&mut self, f: u64) {
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(reg::DRIVER_FEATURES, low_half(f));
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, low_half(f >> 32));
    }
    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the Status read back.
    fn negotiate(&mut self, f: u64) -> u32 {
        self.w(reg::STATUS, ACKNOWLEDGE);
        self.w(reg::STATUS, ACKNOWLEDGE | DRIVER);
        self.driver_features(f);
        self.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        self.r(reg::STATUS)
    }
    fn setup_queue(&mut self, sel: u32, size: u32, base: u64) {
        self.w(reg::QUEUE_SEL, sel);
        self.w(reg::QUEUE_NUM, size);
        for (lo, v) in [
            (reg::QUEUE_DESC_LOW, base),
            (reg::QUEUE_DRIVER_LOW, base + 0x1000),
            (reg::QUEUE_DEVICE_LOW, base + 0x2000),
        ] {
            self.w(lo, low_half(v));
            self.w(lo + 4, low_half(v >> 32));
        }
        self.w(reg::QUEUE_READY, 1);
    }
    fn setup_all(&mut self) {
        self.setup_queue(0, 16, 0x1_0000);
        self.setup_queue(1, 8, 0x2_0000);
    }
    fn driver_ok(&mut self) -> u32 {
        self.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        self.r(reg::STATUS)
    }
    fn activated(&self) -> bool {
        self.dev.lock().unwrap().activated.is_some()
    }
}

const READY: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK;

#[test]
fn identity_registers() {
    let mut r = rig();
    assert_eq!(r.r(reg::MAGIC), 0x7472_6976);
    assert_eq!(r.r(reg::VERSION), 2);
    assert_eq!(r.r(reg::DEVICE_ID), 4);
    assert_eq!(r.r(reg::VENDOR_ID), MMIO_VENDOR_ID);
    assert_eq!(r.r(reg::SHM_LEN_LOW), u32::MAX);
    assert_eq!(r.r(reg::CONFIG_GENERATION), 0);
    assert_eq!(r.r(0x0f0), 0, "hole reads 0");
    // Writes to read-only registers change nothing.
    r.w(reg::MAGIC, 0);
    r.w(reg::DEVICE_ID, 9);
    assert_eq!(r.r(reg::MAGIC), 0x7472_6976);
    assert_eq!(r.r(reg::DEVICE_ID), 4);
}

#[test]
fn device_features_by_selector() {
    let mut r = rig();
    r.w(reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(r.r(reg::DEVICE_FEATURES), low_half(FEATURE_X));
    r.w(reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(r.r(reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
    r.w(reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(r.r(reg::DEVICE_FEATURES), 0);
}

#[test]
fn negotiation_accepts_version_1_subset() {
    let mut r = rig();
    let f = feature(VIRTIO_F_VERSION_1) | FEATURE_X;
    assert_eq!(r.negotiate(f), READY);
    assert_eq!(r.dev.lock().unwrap().acked_features(), f);
    // Feature writes after FEATURES_OK are ignored.
    r.driver_features(feature(VIRTIO_F_VERSION_1));
    r.w(reg::STATUS, 0);
    assert_eq!(r.negotiate(feature(VIRTIO_F_VERSION_1)), READY);
    assert_eq!(
        r.dev.lock().unwrap().acked_features(),
        feature(VIRTIO_F_VERSION_1),
        "reset cleared the old features"
    );
}

#[test]
fn legacy_driver_without_version_1_is_refused() {
    let mut r = rig();
    assert_eq!(r.negotiate(FEATURE_X), ACKNOWLEDGE | DRIVER);
    assert_eq!(r.dev.lock().unwrap().acked_features(), 0);
    // And DRIVER_OK cannot follow without FEATURES_OK.
    r.setup_all();
    assert_eq!(r.driver_ok(), ACKNOWLEDGE | DRIVER);
    assert!(!r.activated());
}

#[test]
fn driver_accepting_unoffered_feature_is_refused() {
    let mut r = rig();
    let status = r.negotiate(feature(VIRTIO_F_VERSION_1) | (1 << 5));
    assert_eq!(status, ACKNOWLEDGE | DRIVER);
}

#[test]
fn features_written_before_driver_are_ignored() {
    let mut r = rig();
    r.w(reg::STATUS, ACKNOWLEDGE);
    r.driver_features(feature(VIRTIO_F_VERSION_1));
    r.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(r.r(reg::STATUS), ACKNOWLEDGE | DRIVER);
}

#[test]
fn status_steps_need_their_prerequisites() {
    let mut r = rig();
    r.w(reg::STATUS, DRIVER);
    assert_eq!(r.r(reg::STATUS), 0, "DRIVER without ACKNOWLEDGE");
    r.w(reg::STATUS, ACKNOWLEDGE | DRIVER);
    assert_eq!(r.r(reg::STATUS), ACKNOWLEDGE | DRIVER);
    r.w(reg::STATUS, ACKNOWLEDGE);
    assert_eq!(
        r.r(reg::STATUS),
        ACKNOWLEDGE | DRIVER,
        "bits cannot be cleared"
    );
    r.w(reg::STATUS, ACKNOWLEDGE | DRIVER | DEVICE_NEEDS_RESET);
    assert_eq!(
        r.r(reg::STATUS),
        ACKNOWLEDGE | DRIVER,
        "NEEDS_RESET is the device's"
    );
    r.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FAILED);
    assert_eq!(r.r(reg::STATUS), ACKNOWLEDGE | DRIVER | FAILED);
    r.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FAILED | FEATURES_OK);
    assert_eq!(
        r.r(reg::STATUS),
        ACKNOWLEDGE | DRIVER | FAILED,
        "nothing moves after FAILED"
    );
}

#[test]
fn queue_setup_and_activation_on_driver_ok() {
    let mut r = rig();
    r.w(reg::QUEUE_SEL, 0);
    assert_eq!(r.r(reg::QUEUE_NUM_MAX), 16);
    r.w(reg::QUEUE_SEL, 1);
    assert_eq!(r.r(reg::QUEUE_NUM_MAX), 8);
    r.w(reg::QUEUE_SEL, 2);
    assert_eq!(r.r(reg::QUEUE_NUM_MAX), 0, "no queue 2");
    r.w(reg::QUEUE_READY, 1);
    assert_eq!(r.r(reg::QUEUE_READY), 0);

    assert_eq!(r.negotiate(feature(VIRTIO_F_VERSION_1)), READY);
    r.setup_queue(0, 4, 0x1_0000);
    r.setup_queue(1, 8, 0x12_3400_0000);
    // Queue 1 points outside memory; fix it while not ready is impossible once ready,
    // so un-ready it first and rewrite.
    r.w(reg::QUEUE_SEL, 1);
    assert_eq!(r.r(reg::QUEUE_READY), 1);
    r.w(reg::QUEUE_READY, 0);
    r.setup_queue(1, 8, 0x2_0000);
    assert!(!r.activated(), "nothing before DRIVER_OK");
    assert_eq!(r.driver_ok(), READY | DRIVER_OK);

    let d = r.dev.lock().unwrap();
    let qs = d.activated.as_ref().unwrap();
    assert_eq!(qs.len(), 2);
    assert_eq!(qs[0].size(), 4);
    assert_eq!(qs[0].desc_table(), 0x1_0000);
    assert_eq!(qs[0].avail_ring(), 0x1_1000);
    assert_eq!(qs[0].used_ring(), 0x1_2000);
    assert!(qs[0].ready());
    assert_eq!(qs[1].size(), 8);
    assert_eq!(qs[1].desc_table(), 0x2_0000);
}

#[test]
fn queue_writes_after_driver_ok_are_ignored() {
    let mut r = rig();
    r.negotiate(feature(VIRTIO_F_VERSION_1));
    r.setup_all();
    assert_eq!(r.driver_ok(), READY | DRIVER_OK);
    r.w(reg::QUEUE_SEL, 0);
    r.w(reg::QUEUE_READY, 0);
    assert_eq!(r.r(reg::QUEUE_READY), 1);
}

fn assert_refused(mut r: Rig, why: fn(&TransportError) -> bool) {
    assert_eq!(r.driver_ok(), READY | DEVICE_NEEDS_RESET);
    let e = r.t.last_activation_error().expect("an activation error");
    assert!(why(e), "unexpected reason {e:?}");
    assert!(!r.activated());
    assert_eq!(r.t.activation_failures(), 1);
    assert_eq!(r.r(reg::INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
    assert_eq!(r.irq.read().unwrap(), 1);
    // A driver that writes DRIVER_OK again still gets nothing until it resets.
    assert_eq!(r.driver_ok(), READY | DEVICE_NEEDS_RESET);
    assert_eq!(r.t.activation_failures(), 1);
    r.w(reg::STATUS, 0);
    assert_eq!(r.r(reg::STATUS), 0);
    assert_eq!(r.r(reg::INTERRUPT_STATUS), 0);
}

#[test]
fn invalid_queues_refuse_activation() {
    type Setup = fn(&mut Rig);
    type Why = fn(&TransportError) -> bool;
    let cases: [(&str, Setup, Why); 7] = [
        (
            "not ready",
            |r| r.setup_queue(0, 16, 0x1_0000),
            |e| matches!(e, TransportError::QueueNotReady { index: 1 }),
        ),
        (
            "size not a power of two",
            |r| {
                r.setup_queue(0, 12, 0x1_0000);
                r.setup_queue(1, 8, 0x2_0000);
            },
            |e| matches!(e, TransportError::QueueConfig { index: 0, .. }),
        ),
        (
            "size above max",
            |r| {
                r.setup_queue(0, 16, 0x1_0000);
                r.setup_queue(1, 16, 0x2_0000);
            },
            |e| matches!(e, TransportError::QueueConfig { index: 1, .. }),
        ),
        (
            "size zero",
            |r| {
                r.setup_queue(0, 0, 0x1_0000);
                r.setup_queue(1, 8, 0x2_0000);
            },
            |e| matches!(e, TransportError::QueueConfig { index: 0, .. }),
        ),
        (
            "size beyond u16",
            |r| {
                r.setup_queue(0, 0x1_0010, 0x1_0000);
                r.setup_queue(1, 8, 0x2_0000);
            },
            |e| matches!(e, TransportError::QueueConfig { index: 0, .. }),
        ),
        (
            "misaligned desc table",
            |r| {
                r.setup_queue(0, 16, 0x1_0008);
                r.setup_queue(1, 8, 0x2_0000);
            },
            |e| matches!(e, TransportError::QueueConfig { index: 0, .. }),
        ),
        (
            "used ring past end of memory",
            |r| {
                r.setup_queue(0, 16, 0x1_0000);
                r.setup_queue(1, 8, (crate::virtio::test_utils::MEM_SIZE as u64) - 0x2010);
            },
            |e| matches!(e, TransportError::QueueMemory { index: 1 }),
        ),
    ];
    for (name, setup, why) in cases {
        let mut r = rig();
        r.negotiate(feature(VIRTIO_F_VERSION_1));
        setup(&mut r);
        eprintln!("case: {name}");
        assert_refused(r, why);
    }
}

#[test]
fn avail_ring_at_zero_is_refused() {
    let mut r = rig();
    r.negotiate(feature(VIRTIO_F_VERSION_1));
    r.setup_all();
    r.w(reg::QUEUE_SEL, 0);
    r.w(reg::QUEUE_READY, 0);
    r.w(reg::QUEUE_DRIVER_LOW, 0);
    r.w(reg::QUEUE_READY, 1);
    assert_refused(r, |e| matches!(e, TransportError::QueueMemory { index: 0 }));
}

#[test]
fn device_activation_error_sets_needs_reset() {
    let mut r = rig();
    r.dev.lock().unwrap().fail_activate = true;
    r.negotiate(feature(VIRTIO_F_VERSION_1));
    r.setup_all();
    assert_refused(r, |e| matches!(e, TransportError::Activate(_)));
}

#[test]
fn reset_returns_everything_to_initial_state() {
    let mut r = rig();
    r.negotiate(feature(VIRTIO_F_VERSION_1));
    r.setup_all();
    r.driver_ok();
    assert!(r.activated());
    r.t.interrupt_status().store(3, Ordering::SeqCst);
    r.w(reg::STATUS, 0);
    assert_eq!(r.r(reg::STATUS), 0);
    assert_eq!(r.r(reg::INTERRUPT_STATUS), 0);
    assert!(!r.activated());
    assert_eq!(r.dev.lock().unwrap().resets, 1);
    for q in 0..2 {
        r.w(reg::QUEUE_SEL, q);
        assert_eq!(r.r(reg::QUEUE_READY), 0);
    }
    // A second bring-up works.
    r.negotiate(feature(VIRTIO_F_VERSION_1));
    r.setup_all();
    assert_eq!(r.driver_ok(), READY | DRIVER_OK);
    assert!(r.activated());
}

#[test]
fn bad_widths_and_offsets_are_ignored() {
    let mut r = rig();
    for len in [1usize, 2, 3, 8] {
        let mut b = vec![0xaau8; len];
        r.t.read(reg::MAGIC, &mut b);
        assert!(b.iter().all(|&x| x == 0), "{len}-byte register read");
    }
    let mut b = [0xaau8; 4];
    r.t.read(reg::MAGIC + 2, &mut b);
    assert_eq!(b, [0; 4], "unaligned register read");
    r.t.read(MMIO_SIZE, &mut b);
    assert_eq!(b, [0; 4]);
    r.t.read(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);
    let mut empty = [0u8; 0];
    r.t.read(reg::MAGIC, &mut empty);

    r.t.write(reg::STATUS, &[1u8]);
    r.t.write(reg::STATUS, &u64::from(ACKNOWLEDGE).to_le_bytes());
    r.t.write(reg::STATUS + 1, &ACKNOWLEDGE.to_le_bytes()[..]);
    r.t.write(u64::MAX, &[1, 2, 3, 4]);
    r.t.write(reg::STATUS, &[]);
    assert_eq!(r.r(reg::STATUS), 0);
    r.w(reg::STATUS, ACKNOWLEDGE);
    assert_eq!(r.r(reg::STATUS), ACKNOWLEDGE);
}

#[test]
fn config_space_any_width_and_offset() {
    let mut r = rig();
    let mut b = [0u8; 2];
    r.t.read(reg::CONFIG + 1, &mut b);
    assert_eq!(b, [2, 3]);
    let mut b = [0xffu8; 4];
    r.t.read(reg::CONFIG + 6, &mut b);
    assert_eq!(b, [7, 8, 0, 0], "straddling the end of config space");
    let mut b = [0xffu8; 8];
    r.t.read(reg::CONFIG, &mut b);
    assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
    let mut b = [0xffu8; 1];
    r.t.read(MMIO_SIZE - 1, &mut b);
    assert_eq!(b, [0]);
    r.t.write(reg::CONFIG + 3, &[9]);
    assert_eq!(r.dev.lock().unwrap().config_writes, vec![(3, vec![9])]);
}

#[test]
fn interrupt_status_and_ack() {
    let mut r = rig();
    r.t.interrupt.signal_used_queue();
    r.t.interrupt.signal_config_change();
    assert_eq!(r.irq.read().unwrap(), 2);
    assert_eq!(
        r.r(reg::INTERRUPT_STATUS),
        INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE
    );
    r.w(reg::INTERRUPT_ACK, INTERRUPT_USED_BUFFER);
    assert_eq!(r.r(reg::INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
    r.w(reg::INTERRUPT_ACK, INTERRUPT_CONFIG_CHANGE);
    assert_eq!(r.r(reg::INTERRUPT_STATUS), 0);
    r.w(reg::INTERRUPT_STATUS, 3);
    assert_eq!(
        r.r(reg::INTERRUPT_STATUS),
        0,
        "InterruptStatus is read-only"
    );
}

#[test]
fn queue_notify_signals_the_queue_eventfd() {
    let mut r = rig();
    r.w(reg::QUEUE_NOTIFY, 1);
    r.w(reg::QUEUE_NOTIFY, 1);
    r.w(reg::QUEUE_NOTIFY, 7);
    r.w(reg::QUEUE_NOTIFY, u32::MAX);
    // The transport's EventFds are the device's: reading through the device's copy
    // drains what the notify wrote.
    let d = r.dev.lock().unwrap();
    assert_eq!(d.queue_events()[1].read().unwrap(), 2);
    assert!(
        d.queue_events()[0].read().is_err(),
        "queue 0 was not notified"
    );
    assert_eq!(r.t.queue_evts().len(), 2);
}

#[test]
fn construction_checks_the_device() {
    let irq = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let dev = Arc::new(Mutex::new(Dummy::new(&[12])));
    assert!(matches!(
        MmioTransport::new(dev, mem(), irq()),
        Err(TransportError::QueueMaxSize { index: 0, size: 12 })
    ));
    let mut d = Dummy::new(&[16, 16]);
    d.common.queue_evts.pop();
    assert!(matches!(
        MmioTransport::new(Arc::new(Mutex::new(d)), mem(), irq()),
        Err(TransportError::QueueEventCount {
            queues: 2,
            events: 1
        })
    ));
}
