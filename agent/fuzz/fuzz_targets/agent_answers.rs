//! Arbitrary bytes as the guest agent's side of a connection, read by the host-side client
//! through each request it makes (handshake, health, exec, manifest, workload status, logs,
//! resync):
//! every answer must end in `Ok` or `Err`, never a panic, a hang or an unbounded allocation.

#![no_main]

use std::io::{Cursor, Read, Write};

use agent::{AgentClient, ExecRequest, ManifestDelivery, RawManifest, ResyncRequest, WorkloadSpec};
use libfuzzer_sys::fuzz_target;

/// Reads come from the fuzz input; writes go nowhere.
struct Guest(Cursor<Vec<u8>>);

impl Read for Guest {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Guest {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let mut c = AgentClient::new(Guest(Cursor::new(rest.to_vec()))).with_output_limit(1 << 16);
    match which % 7 {
        0 => drop(c.hello()),
        1 => drop(c.health()),
        2 => drop(c.exec(&ExecRequest::new(["/bin/true"]))),
        3 => {
            let delivery = ManifestDelivery {
                vm_id: "vm-fuzz".into(),
                hostname: "vm-fuzz".into(),
                workload: WorkloadSpec {
                    argv: vec!["/bin/true".into()],
                    env: Vec::new(),
                    cwd: None,
                },
                manifest: RawManifest::from_json("{}".into()).expect("a valid object"),
            };
            drop(c.send_manifest(&delivery));
        }
        4 => drop(c.workload_status()),
        5 => drop(c.logs(0, 1 << 20)),
        _ => {
            let req = ResyncRequest::new(
                1_700_000_000_000_000_000,
                &[0x5a; 32],
                Some("vm-fuzz".into()),
            );
            drop(c.resync(&req));
        }
    }
});
