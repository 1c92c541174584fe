//! `lockstep-agent`: parses flags (a `serve --config` file becomes flags first) and runs the
//! command.

use clap::Parser;
use lockstep_agent::cli::{Cli, run};

fn main() -> std::process::ExitCode {
    let argv = match lockstep_agent::config::expand(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(err) => {
            return std::process::ExitCode::from(
                u8::try_from(lockstep_process::report_error(&err)).unwrap_or(2),
            );
        }
    };
    lockstep_process::run_binary("warn", run(Cli::parse_from(argv)))
}
