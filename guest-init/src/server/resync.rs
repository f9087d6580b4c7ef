//! `Resync`: after a snapshot restore, take the host's time, fresh randomness and maybe a
//! new hostname (semantics in the `agent` crate docs, "Resync").
//!
//! Split in two so the logic runs on the host without touching it: [`plan`] checks and
//! decodes the request (pure), [`apply`] carries the plan out on a [`Machine`], which in the
//! guest is [`Guest`] (the real system calls) and in tests a recording fake.

use std::io;

use agent::{ErrorCode, ErrorInfo, ResyncReply, ResyncRequest};

use crate::sys;

/// What the guest needs changed; every field already checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The new `CLOCK_REALTIME`, nanoseconds since the Unix epoch.
    pub unix_time_ns: u64,
    /// Bytes for the kernel's entropy pool.
    pub seed: Vec<u8>,
    /// The new hostname, if any.
    pub hostname: Option<String>,
}

/// Checks and decodes a request. The message names the offending field; the caller answers
/// it as `bad_request`.
pub fn plan(req: &ResyncRequest) -> Result<Plan, String> {
    req.validate()?;
    let seed = req.seed_bytes()?;
    sys::unix_ns_to_timespec(req.unix_time_ns)
        .map_err(|_| format!("unix_time_ns {} is out of range", req.unix_time_ns))?;
    Ok(Plan {
        unix_time_ns: req.unix_time_ns,
        seed,
        hostname: req.hostname.clone(),
    })
}

/// The system calls a resync makes.
pub trait Machine: Send + Sync {
    /// `CLOCK_REALTIME` in nanoseconds since the Unix epoch.
    fn realtime_ns(&self) -> io::Result<i128>;
    /// Sets `CLOCK_REALTIME`.
    fn set_realtime(&self, unix_time_ns: u64) -> io::Result<()>;
    /// Adds entropy; `Ok(true)` if it was credited, `Ok(false)` if only mixed in.
    fn add_entropy(&self, seed: &[u8]) -> io::Result<bool>;
    /// Sets the hostname.
    fn set_hostname(&self, name: &str) -> io::Result<()>;
    /// The current hostname.
    fn hostname(&self) -> io::Result<String>;
}

/// The guest itself: the real system calls (PID 1 has the capabilities they need).
pub struct Guest;

impl Machine for Guest {
    fn realtime_ns(&self) -> io::Result<i128> {
        sys::realtime_ns()
    }

    fn set_realtime(&self, unix_time_ns: u64) -> io::Result<()> {
        sys::set_realtime(unix_time_ns)
    }

    fn add_entropy(&self, seed: &[u8]) -> io::Result<bool> {
        sys::add_entropy(seed)
    }

    fn set_hostname(&self, name: &str) -> io::Result<()> {
        sys::set_hostname(name)
    }

    fn hostname(&self) -> io::Result<String> {
        sys::hostname()
    }
}

fn internal(what: &str, e: &io::Error) -> ErrorInfo {
    ErrorInfo::new(ErrorCode::Internal, format!("{what}: {e}"))
}

/// New minus old realtime, in whole milliseconds (towards zero), saturated to `i64`.
pub fn clock_step_ms(old_ns: i128, new_ns: u64) -> i64 {
    let step = i128::from(new_ns).saturating_sub(old_ns) / 1_000_000;
    i64::try_from(step).unwrap_or(if step < 0 { i64::MIN } else { i64::MAX })
}

/// Carries out a plan: clock, entropy, hostname, in that order; a failure stops there with
/// an `internal` error (the earlier steps stay done).
pub fn apply(plan: &Plan, machine: &dyn Machine) -> Result<ResyncReply, ErrorInfo> {
    let old = machine
        .realtime_ns()
        .map_err(|e| internal("reading the clock", &e))?;
    machine
        .set_realtime(plan.unix_time_ns)
        .map_err(|e| internal("setting the clock", &e))?;
    let entropy_credited = machine
        .add_entropy(&plan.seed)
        .map_err(|e| internal("adding entropy", &e))?;
    if let Some(name) = &plan.hostname {
        machine
            .set_hostname(name)
            .map_err(|e| internal("setting the hostname", &e))?;
    }
    let hostname = machine
        .hostname()
        .map_err(|e| internal("reading the hostname", &e))?;
    Ok(ResyncReply {
        clock_step_ms: clock_step_ms(old, plan.unix_time_ns),
        entropy_credited,
        hostname,
    })
}

/// The whole request: `bad_request` for a request that fails [`plan`] (nothing changed),
/// else [`apply`].
pub fn handle(req: &ResyncRequest, machine: &dyn Machine) -> Result<ResyncReply, ErrorInfo> {
    let plan = plan(req).map_err(|m| ErrorInfo::new(ErrorCode::BadRequest, m))?;
    apply(&plan, machine)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A machine that records what was asked of it, with a settable clock and failures.
    #[derive(Default)]
    pub(crate) struct FakeMachine {
        pub(crate) state: Mutex<FakeState>,
    }

    #[derive(Default, Debug)]
    pub(crate) struct FakeState {
        pub(crate) now_ns: i128,
        pub(crate) hostname: String,
        pub(crate) entropy: Vec<Vec<u8>>,
        /// Whether `add_entropy` reports the fallback (no credit).
        pub(crate) no_credit: bool,
        /// Which call fails: "clock", "entropy" or "hostname".
        pub(crate) fail: Option<&'static str>,
        pub(crate) calls: Vec<&'static str>,
    }

    impl FakeMachine {
        pub(crate) fn new(now_ns: i128, hostname: &str) -> FakeMachine {
            FakeMachine {
                state: Mutex::new(FakeState {
                    now_ns,
                    hostname: hostname.into(),
                    ..FakeState::default()
                }),
            }
        }

        fn step(&self, call: &'static str) -> io::Result<std::sync::MutexGuard<'_, FakeState>> {
            let mut s = self.state.lock().unwrap();
            s.calls.push(call);
            if s.fail == Some(call) {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            Ok(s)
        }
    }

    impl Machine for FakeMachine {
        fn realtime_ns(&self) -> io::Result<i128> {
            Ok(self.state.lock().unwrap().now_ns)
        }

        fn set_realtime(&self, unix_time_ns: u64) -> io::Result<()> {
            self.step("clock")?.now_ns = i128::from(unix_time_ns);
            Ok(())
        }

        fn add_entropy(&self, seed: &[u8]) -> io::Result<bool> {
            let mut s = self.step("entropy")?;
            s.entropy.push(seed.to_vec());
            Ok(!s.no_credit)
        }

        fn set_hostname(&self, name: &str) -> io::Result<()> {
            self.step("hostname")?.hostname = name.into();
            Ok(())
        }

        fn hostname(&self) -> io::Result<String> {
            Ok(self.state.lock().unwrap().hostname.clone())
        }
    }

    const SNAPSHOT_NS: i128 = 1_700_000_000_000_000_000;

    fn request(hostname: Option<&str>) -> ResyncRequest {
        let seed: Vec<u8> = (0..40).collect();
        ResyncRequest::new(1_700_000_090_500_000_000, &seed, hostname.map(Into::into))
    }

    #[test]
    fn plan_decodes_a_valid_request() {
        let p = plan(&request(Some("clone-3"))).unwrap();
        assert_eq!(p.unix_time_ns, 1_700_000_090_500_000_000);
        assert_eq!(p.seed, (0..40).collect::<Vec<u8>>());
        assert_eq!(p.hostname.as_deref(), Some("clone-3"));
        assert_eq!(plan(&request(None)).unwrap().hostname, None);
    }

    #[test]
    fn invalid_requests_change_nothing() {
        let m = FakeMachine::new(SNAPSHOT_NS, "template");
        let mut short = request(None);
        short.seed.truncate(62);
        let mut not_hex = request(None);
        not_hex.seed.replace_range(..2, "g0");
        let mut huge = request(None);
        huge.seed = "00".repeat(257);
        let bad_host = request(Some("bad host"));
        for (req, word) in [
            (short, "seed"),
            (not_hex, "hex"),
            (huge, "seed"),
            (bad_host, "hostname"),
        ] {
            let e = handle(&req, &m).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.contains(word), "{}", e.message);
        }
        assert!(m.state.lock().unwrap().calls.is_empty());
    }

    #[test]
    fn apply_sets_clock_entropy_and_hostname_in_order() {
        let m = FakeMachine::new(SNAPSHOT_NS, "template");
        let reply = handle(&request(Some("clone-3")), &m).unwrap();
        assert_eq!(
            reply,
            ResyncReply {
                clock_step_ms: 90_500,
                entropy_credited: true,
                hostname: "clone-3".into(),
            }
        );
        let s = m.state.lock().unwrap();
        assert_eq!(s.calls, ["clock", "entropy", "hostname"]);
        assert_eq!(s.now_ns, 1_700_000_090_500_000_000);
        assert_eq!(s.entropy, [(0..40).collect::<Vec<u8>>()]);
    }

    #[test]
    fn without_a_hostname_the_current_one_is_reported() {
        let m = FakeMachine::new(SNAPSHOT_NS, "template");
        m.state.lock().unwrap().no_credit = true;
        let reply = handle(&request(None), &m).unwrap();
        assert_eq!(reply.hostname, "template");
        assert!(!reply.entropy_credited);
        assert_eq!(m.state.lock().unwrap().calls, ["clock", "entropy"]);
    }

    #[test]
    fn failures_are_internal_and_stop_there() {
        for (fail, done) in [
            ("clock", &["clock"][..]),
            ("entropy", &["clock", "entropy"][..]),
            ("hostname", &["clock", "entropy", "hostname"][..]),
        ] {
            let m = FakeMachine::new(SNAPSHOT_NS, "template");
            m.state.lock().unwrap().fail = Some(fail);
            let e = handle(&request(Some("clone")), &m).unwrap_err();
            assert_eq!(e.code, ErrorCode::Internal);
            assert!(e.message.contains(fail), "{}", e.message);
            assert_eq!(m.state.lock().unwrap().calls, done);
        }
    }

    #[test]
    fn clock_step_in_both_directions_and_at_the_extremes() {
        assert_eq!(clock_step_ms(2_000_000_000, 1_000_000_000), -1000);
        assert_eq!(clock_step_ms(1_000_000_000, 3_500_999_999), 2500);
        assert_eq!(clock_step_ms(0, 0), 0);
        assert_eq!(clock_step_ms(i128::MIN, u64::MAX), i64::MAX);
        assert_eq!(clock_step_ms(i128::MAX, 0), i64::MIN);
    }
}
