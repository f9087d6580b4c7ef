//! `orchestrator`: the daemon (`serve`) and its command-line client (see
//! `orchestrator::cli` and README "orchestrator").

use clap::Parser;

fn main() {
    let cli = orchestrator::cli::Cli::parse();
    match orchestrator::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("orchestrator: error: {e:#}");
            std::process::exit(1);
        }
    }
}
