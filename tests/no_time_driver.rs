//! An upgrade on a runtime without its time driver fails with a clear error
//! before any child is started, and leaves the state as it found it: the next
//! upgrade is not refused as "already in progress" (the state used to stay at
//! Upgrading after the upgrade task panicked past the fork).
//!
//! One test in this binary: a process can create one `Handover`.

use handover::{Error, Handover, Options};

#[test]
fn an_upgrade_without_a_time_driver_fails_cleanly_and_can_be_retried() {
    let handover = Handover::new(Options::default().upgrade_signal(None)).expect("Handover::new");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for attempt in 1..=2 {
            match handover.upgrade().await {
                Err(Error::NoRuntime { operation }) => {
                    assert!(operation.contains("time"), "attempt {attempt}: {operation}")
                }
                other => panic!("attempt {attempt}: expected NoRuntime, got {other:?}"),
            }
        }
    });
    // No child was started: no thread of this process has one.
    let mut children = String::new();
    for task in std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .flatten()
    {
        children += &std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
    }
    assert!(children.trim().is_empty(), "children: {children}");
}
