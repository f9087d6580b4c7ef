//! `jailer`: runs one `vmm` confined (see `orchestrator::jailer` and README "jailer").

use anyhow::Context;
use clap::Parser;
use orchestrator::jailer::{run, JailerArgs};

fn main() {
    let args = JailerArgs::parse();
    let id = args.id.clone();
    match run(args).with_context(|| format!("vm {id}")) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("jailer: error: {e:#}");
            std::process::exit(1);
        }
    }
}
