//! Signals of a library app: the stop signals start a final stop, the
//! upgrade signal an upgrade. Tokio's handlers are process-wide and never
//! uninstalled, so each kind is installed once per process.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::handover::Handover;
use crate::Signal;

/// Which handlers are installed.
#[derive(Default)]
pub(crate) struct Installed {
    stop: AtomicBool,
    upgrade: AtomicBool,
}

fn kind(signal: Signal) -> SignalKind {
    SignalKind::from_raw(signal as i32)
}

/// Installs the stop signal handlers, once: they start a final stop. Done as
/// soon as the app takes a listener, so that even a generation that never
/// becomes ready drains on the stop signal rather than dies with requests in
/// flight.
pub(crate) fn install_stop(handover: &Handover, installed: &Installed) -> Result<()> {
    if installed.stop.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let result = handover
        .inner
        .options
        .stop_signals
        .iter()
        .try_for_each(|&sig| {
            on_each(handover, sig, "stop", Handover::shutdown)
                .map_err(|e| Error::io("installing a stop signal handler", e))
        });
    if result.is_err() {
        installed.stop.store(false, Ordering::SeqCst);
    }
    result
}

/// Installs the upgrade signal handler, once (at `ready`): each signal
/// starts an upgrade beside the loop, so that a burst is refused one by one
/// rather than queued.
pub(crate) fn install_upgrade(handover: &Handover, installed: &Installed) -> Result<()> {
    let Some(sig) = handover.inner.options.upgrade_signal else {
        return Ok(());
    };
    if installed.upgrade.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let upgrade = |h: &Handover| {
        if h.is_supervised() {
            warn!("upgrade signal ignored: the handover supervisor owns upgrades");
        } else {
            h.spawn_upgrade();
        }
    };
    if let Err(e) = on_each(handover, sig, "upgrade", upgrade) {
        installed.upgrade.store(false, Ordering::SeqCst);
        return Err(Error::io("installing the upgrade signal handler", e));
    }
    Ok(())
}

/// Runs `action` at each delivery of `sig`, in a task of its own, logging
/// each one as a `what` signal.
fn on_each(
    handover: &Handover,
    sig: Signal,
    what: &'static str,
    action: impl Fn(&Handover) + Send + 'static,
) -> std::io::Result<()> {
    let mut stream = signal(kind(sig))?;
    let h = handover.clone();
    tokio::spawn(async move {
        while stream.recv().await.is_some() {
            info!(
                generation = h.generation(),
                signal = sig.as_str(),
                kind = what,
                "signal received"
            );
            action(&h);
        }
    });
    Ok(())
}
