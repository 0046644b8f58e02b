//! `handover run`, the container entrypoint, and its clients `handover
//! upgrade` and `handover status`: a PID-1 supervisor that owns the listening
//! sockets and swaps app generations on SIGHUP or on request. The README's
//! "Container entrypoint" section is its user guide; nothing here is public
//! API: the `handover` binary calls [`main`] (re-exported, hidden, as
//! `handover::__main`) and nothing else.

mod admin;
mod cli;
mod control;
mod error;
mod log;
mod log_json;
mod metrics;
mod signals;
mod spawn;
mod status;
mod supervise;

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;

use self::cli::Command;
use self::log::Logger;

/// The whole `handover` binary: parses `args` (without the program name),
/// installs the logger for `run`, runs the subcommand, and returns the exit
/// code. Not an API: it exists so that the binary is a few lines.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let code = dispatch(args, &mut std::io::stdout(), &mut std::io::stderr());
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// [`main`], writing to `out` and `err`; returns the exit code.
fn dispatch(
    args: impl IntoIterator<Item = OsString>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let command = match cli::parse(args) {
        Ok(command) => command,
        Err(e) => {
            let _ = writeln!(err, "handover: {e}");
            return 2;
        }
    };
    match command {
        Command::Help(text) => {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
            0
        }
        Command::Version => {
            let _ = writeln!(out, "handover {}", env!("CARGO_PKG_VERSION"));
            let _ = out.flush();
            0
        }
        Command::Run(config) => {
            if tracing::subscriber::set_global_default(Logger::from_env()).is_err() {
                let _ = writeln!(err, "handover: a logger was already installed");
            }
            // It blocks every signal it can in this thread (they are read
            // from a signalfd): the binary's main thread, with no other
            // thread running.
            match supervise::run(*config) {
                Ok(code) => code,
                Err(e) => {
                    let _ = writeln!(err, "handover: {}", e.report());
                    e.exit_code()
                }
            }
        }
        Command::Upgrade(config) => control::upgrade(&config, out, err),
        Command::Status(config) if config.check => admin::check(&config, out, err),
        Command::Status(config) => control::status(&config, out, err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> (i32, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = dispatch(args.iter().map(OsString::from), &mut out, &mut err);
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn help_version_and_usage_errors_go_to_the_handles() {
        let (code, out, err) = run(&["--version"]);
        assert_eq!((code, err.as_str()), (0, ""));
        assert_eq!(out, format!("handover {}\n", env!("CARGO_PKG_VERSION")));
        let (code, out, _) = run(&["run", "--help"]);
        assert_eq!(code, 0);
        assert_eq!(out, cli::RUN_HELP);
        let (code, out, err) = run(&["bogus"]);
        assert_eq!((code, out.as_str()), (2, ""));
        assert_eq!(
            err,
            "handover: unknown subcommand \"bogus\" (use run, upgrade or status)\n"
        );
    }
}
