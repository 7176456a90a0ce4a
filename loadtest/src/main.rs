//! `loadtest`: see `loadtest --help` and the crate docs in `lib.rs`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = loadtest::cli::Cli::parse();
    match loadtest::run::main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
