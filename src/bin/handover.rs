//! The `handover` binary: argument parsing, then the supervisor or a client.
//! See `handover --help`.

use std::process::ExitCode;

use handover::supervisor::{self, cli, Command, Logger};

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args_os().skip(1)) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("handover: {e}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("handover {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Run(config) => {
            if tracing::subscriber::set_global_default(Logger::from_env()).is_err() {
                eprintln!("handover: a logger was already installed");
            }
            match supervisor::run(config) {
                Ok(code) => exit(code),
                Err(e) => {
                    eprintln!("handover: {}", e.report());
                    exit(e.exit_code())
                }
            }
        }
        Command::Upgrade(config) => exit(supervisor::upgrade(
            &config,
            &mut std::io::stdout(),
            &mut std::io::stderr(),
        )),
        Command::Status(config) => exit(supervisor::status(
            &config,
            &mut std::io::stdout(),
            &mut std::io::stderr(),
        )),
        _ => ExitCode::from(2),
    }
}
