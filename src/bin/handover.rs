//! The `handover` binary: `handover run`, `upgrade` and `status` (see
//! `handover --help` and the README). It lives in the library, behind one
//! hidden entry point.

fn main() -> std::process::ExitCode {
    handover::__main(std::env::args_os().skip(1))
}
