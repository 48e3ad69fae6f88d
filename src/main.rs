use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    egress_proxy::cli::run(egress_proxy::cli::Cli::parse())
}
