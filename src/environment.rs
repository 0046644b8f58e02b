//! The protocol variables, taken out of the process environment before
//! `main` runs.
//!
//! The app's own children must not inherit `LISTEN_FDS`, `NOTIFY_SOCKET` and
//! the rest, but changing the environment races with any other thread that
//! reads it, and an app under `#[tokio::main]` has threads before its first
//! line. So the variables are read and removed by a function in the
//! executable's `.init_array`, which the loader runs before `main`, while the
//! process has exactly one thread. [`Handover::new`](crate::Handover::new),
//! whenever and from whatever thread it is called, then reads this snapshot;
//! the environment itself is never touched again.

use std::ffi::OsString;
use std::sync::OnceLock;

use crate::protocol;

/// What `take_at_start` found, in the order of [`protocol::VARIABLES`].
static SNAPSHOT: OnceLock<Vec<(&'static str, OsString)>> = OnceLock::new();

/// Run by the loader before `main` (and before any thread of the program
/// exists): the ELF `.init_array` of the executable that links this crate.
#[used]
#[link_section = ".init_array"]
static TAKE_AT_START: extern "C" fn() = take_at_start;

extern "C" fn take_at_start() {
    let found = read();
    for (name, _) in &found {
        // The process has one thread: nothing else can read the
        // environment while it changes.
        std::env::remove_var(name);
    }
    let _ = SNAPSHOT.set(found);
}

fn read() -> Vec<(&'static str, OsString)> {
    protocol::VARIABLES
        .iter()
        .filter_map(|name| std::env::var_os(name).map(|value| (*name, value)))
        .collect()
}

/// The protocol variables this process was started with. Should the
/// start-up function not have run (a program loaded in an unusual way), they
/// are read now and left in the environment.
pub(crate) fn protocol_variables() -> &'static [(&'static str, OsString)] {
    // Referenced here so that the linker keeps the start-up function with
    // the code that needs its snapshot.
    std::hint::black_box(&TAKE_AT_START);
    SNAPSHOT.get_or_init(read)
}

/// The value of protocol variable `name` at start-up.
pub(crate) fn protocol_variable(name: &str) -> Option<&'static OsString> {
    protocol_variables()
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

/// The environment to pass on to a new generation: the process environment
/// now, without any protocol variable.
pub(crate) fn inheritable() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| !k.to_str().is_some_and(|k| protocol::VARIABLES.contains(&k)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_was_taken_before_main() {
        // The test binary links this crate too: its start-up function ran.
        assert!(SNAPSHOT.get().is_some(), "take_at_start did not run");
        assert!(protocol_variables().len() <= protocol::VARIABLES.len());
        for (name, _) in protocol_variables() {
            assert!(std::env::var_os(name).is_none(), "{name} is still set");
        }
    }
}
