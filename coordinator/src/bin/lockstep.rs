//! `lockstep`: parses flags and runs the command.

use clap::Parser;
use lockstep_coordinator::cli::{Cli, run};

fn main() -> std::process::ExitCode {
    lockstep_process::run_binary("info", run(Cli::parse()))
}
