//! The lifecycle of one generation, with a single owner for its state.
//!
//! ```text
//!            begin_upgrade            succeed
//!  Serving ───────────────▶ Upgrading ───────▶ Stopping (Stop::Upgraded)
//!     ▲                        │
//!     └────────── fail ────────┘   (or Stopping, when a final stop came meanwhile)
//!
//!  Serving ── shutdown ──▶ Stopping (Stop::Shutdown)
//!  Upgrading ── shutdown ──▶ Upgrading, stop requested: the upgrade ends in Stopping
//! ```
//!
//! Every transition is a method here; the rest of the crate asks, it never
//! sets. The state is a watch channel, so that a final stop can wait for a
//! running upgrade to reach its outcome ([`Lifecycle::settled`]), and an
//! upgrade holds an [`UpgradeSlot`] whose drop always leaves `Upgrading`,
//! even when the task running it panics.

use std::sync::Arc;

use tokio::sync::watch;

use crate::drain::{Drain, Stop};
use crate::error::{Error, Result};
use crate::Upgraded;

/// Where this generation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Serving; an upgrade may start.
    Serving,
    /// An upgrade is running.
    Upgrading,
    /// Replaced or told to stop: draining.
    Stopping,
}

#[derive(Debug, Clone, Copy)]
struct State {
    phase: Phase,
    /// A final stop was asked for while an upgrade ran.
    stop_requested: bool,
    /// A new generation said it was ready on our sockets (even if a final
    /// stop raced with it): they are no longer ours alone.
    replaced: bool,
    /// This generation is ready but not promoted yet: the previous one may
    /// still roll back to itself, so this one starts no upgrade.
    on_probation: bool,
}

/// The owner of this generation's state and of its drain.
pub(crate) struct Lifecycle {
    state: watch::Sender<State>,
    drain: Drain,
}

impl Lifecycle {
    pub(crate) fn new() -> Arc<Self> {
        let (state, _) = watch::channel(State {
            phase: Phase::Serving,
            stop_requested: false,
            replaced: false,
            on_probation: false,
        });
        Arc::new(Lifecycle {
            state,
            drain: Drain::new(),
        })
    }

    pub(crate) fn phase(&self) -> Phase {
        self.state.borrow().phase
    }

    pub(crate) fn drain(&self) -> &Drain {
        &self.drain
    }

    /// Whether a new generation took over our sockets at some point.
    pub(crate) fn replaced(&self) -> bool {
        self.state.borrow().replaced
    }

    /// `Serving` to `Upgrading`, or why not.
    pub(crate) fn begin_upgrade(self: &Arc<Self>) -> Result<UpgradeSlot> {
        let mut refusal = None;
        self.state.send_if_modified(|s| match s.phase {
            Phase::Serving if s.on_probation => {
                refusal = Some(Error::OnProbation);
                false
            }
            Phase::Serving => {
                s.phase = Phase::Upgrading;
                true
            }
            Phase::Upgrading => {
                refusal = Some(Error::UpgradeInProgress);
                false
            }
            Phase::Stopping => {
                refusal = Some(Error::Stopping);
                false
            }
        });
        match refusal {
            Some(e) => Err(e),
            None => Ok(UpgradeSlot {
                lifecycle: self.clone(),
                resolved: false,
            }),
        }
    }

    /// A final stop: the app is told at once ([`Stop::Shutdown`]); a running
    /// upgrade ends in `Stopping` whatever its outcome. Returns whether this
    /// call started the stop.
    pub(crate) fn shutdown(&self) -> bool {
        self.state.send_modify(|s| match s.phase {
            Phase::Serving => s.phase = Phase::Stopping,
            Phase::Upgrading => s.stop_requested = true,
            Phase::Stopping => {}
        });
        self.drain.stop(Stop::Shutdown)
    }

    /// Marks this generation as on probation (ready, not promoted yet) or
    /// not.
    pub(crate) fn set_on_probation(&self, on: bool) {
        self.state.send_if_modified(|s| {
            let changed = s.on_probation != on;
            s.on_probation = on;
            changed
        });
    }

    /// Parks (stops accepting for now, winding connections down, keeping
    /// listeners and state) or resumes this generation.
    pub(crate) fn park(&self, parked: bool) {
        if self.drain.park(parked) {
            tracing::info!(
                pid = std::process::id(),
                "{}",
                if parked {
                    "parked: accepting nothing new while the new generation takes over"
                } else {
                    "resumed: accepting again"
                }
            );
        }
    }

    /// Waits until no upgrade is running (at once when none is).
    pub(crate) async fn settled(&self) {
        let mut rx = self.state.subscribe();
        // The sender lives in `self`, so the channel cannot close here.
        let _ = rx.wait_for(|s| s.phase != Phase::Upgrading).await;
    }
}

/// The right to run the one upgrade in progress. Resolve it with
/// [`succeed`](UpgradeSlot::succeed) or [`fail`](UpgradeSlot::fail); dropped
/// unresolved (the upgrade task panicked, or was cancelled), it fails.
pub(crate) struct UpgradeSlot {
    lifecycle: Arc<Lifecycle>,
    resolved: bool,
}

impl UpgradeSlot {
    /// The new generation said it is ready on our sockets.
    pub(crate) fn mark_replaced(&self) {
        self.lifecycle.state.send_modify(|s| s.replaced = true);
    }

    /// Whether a final stop was asked for since the upgrade began.
    #[cfg(test)]
    pub(crate) fn stop_requested(&self) -> bool {
        self.lifecycle.state.borrow().stop_requested
    }

    /// The new generation serves: this one stops accepting and drains.
    pub(crate) fn succeed(mut self, upgraded: Upgraded) {
        self.resolved = true;
        self.lifecycle.drain.stop(Stop::Upgraded(upgraded));
        self.lifecycle
            .state
            .send_modify(|s| s.phase = Phase::Stopping);
    }

    /// The upgrade failed: this generation serves on, unless a final stop
    /// came meanwhile.
    pub(crate) fn fail(mut self) {
        self.resolved = true;
        self.restore();
    }

    fn restore(&self) {
        self.lifecycle.state.send_modify(|s| {
            s.phase = if s.stop_requested {
                Phase::Stopping
            } else {
                Phase::Serving
            }
        });
    }
}

impl Drop for UpgradeSlot {
    fn drop(&mut self) {
        if !self.resolved {
            tracing::error!(
                "the upgrade ended without an outcome (its task panicked?); serving on"
            );
            self.restore();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgraded() -> Upgraded {
        Upgraded {
            pid: 2,
            generation: 2,
            ready_after: std::time::Duration::ZERO,
            probation: std::time::Duration::ZERO,
        }
    }

    #[test]
    fn one_upgrade_at_a_time_and_a_lost_slot_serves_on() {
        let life = Lifecycle::new();
        let slot = life.begin_upgrade().unwrap();
        assert!(matches!(
            life.begin_upgrade(),
            Err(Error::UpgradeInProgress)
        ));
        drop(slot); // as when the task running it panics
        assert_eq!(life.phase(), Phase::Serving);
        let slot = life.begin_upgrade().unwrap();
        slot.fail();
        assert_eq!(life.phase(), Phase::Serving);
        let slot = life.begin_upgrade().unwrap();
        slot.mark_replaced();
        slot.succeed(upgraded());
        assert_eq!(life.phase(), Phase::Stopping);
        assert!(life.replaced());
        assert!(matches!(life.begin_upgrade(), Err(Error::Stopping)));
        assert!(!life.shutdown(), "already stopping, for the upgrade");
    }

    #[tokio::test]
    async fn a_stop_during_an_upgrade_waits_for_its_outcome() {
        let life = Lifecycle::new();
        let slot = life.begin_upgrade().unwrap();
        assert!(life.shutdown());
        assert!(slot.stop_requested());
        assert_eq!(life.phase(), Phase::Upgrading);
        let waiter = tokio::spawn({
            let life = life.clone();
            async move { life.settled().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        slot.fail();
        waiter.await.unwrap();
        assert_eq!(life.phase(), Phase::Stopping, "a stop came: no serving on");
    }
}
