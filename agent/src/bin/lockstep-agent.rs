//! `lockstep-agent`: parses flags and runs the command.

use clap::Parser;
use lockstep_agent::cli::{Cli, run};

fn main() -> std::process::ExitCode {
    lockstep_process::run_binary("warn", run(Cli::parse()))
}
