//! Probation in library mode: once the new generation is ready, this (old)
//! generation parks and watches it for [`Options::probation`](crate::Options::probation).
//! The new generation must stay alive, pass the health check and not say it
//! is unhealthy; any failure resumes this generation at once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use futures::future::{BoxFuture, FutureExt};
use tracing::{debug, info, warn};

use crate::channel::{self, Message};
use crate::handover::{lock, Handover};
use crate::health::Probe;
use crate::options::Health;
use crate::sys::{self, Child, Exec};
use crate::Signal;

const NO_TCP: &str = "no TCP listener to check";

/// How a probation ended.
pub(crate) enum Verdict {
    /// The window passed with every check healthy.
    Promoted,
    /// The new generation failed: the kind (`exited`, `unhealthy`,
    /// `health_check`, for the metrics), and why.
    Failed(&'static str, String),
    /// A final stop of this generation came first.
    Stopped,
}

impl Handover {
    /// Watches the new generation for the probation window, parked; the
    /// caller promotes or rolls back by the verdict.
    pub(crate) async fn probation(
        &self,
        child: &mut Child,
        control: &channel::Receiver,
        ready_at: Instant,
    ) -> Verdict {
        let options = &self.inner.options;
        let window = options.probation;
        let pid = child.pid();
        let generation = self.inner.generation.saturating_add(1);
        let health = options.health.clone();
        let target = self.health_address();
        info!(
            pid,
            window_ms = window.as_millis() as u64,
            health = ?health,
            "new generation on probation; this generation is parked"
        );
        if let Err(e) = channel::send(control.as_fd(), &Message::Probation(window)) {
            debug!(error = %e, "cannot tell the new generation it is on probation");
        }
        let watch = self.watch();
        let end = tokio::time::sleep(window);
        tokio::pin!(end);
        // Checks start every interval (the first at once), one at a time.
        let mut next_check = Box::pin(tokio::time::sleep(std::time::Duration::ZERO));
        // The health check in flight, when `checking`.
        let mut check: BoxFuture<'static, Result<(), String>> = std::future::pending().boxed();
        let mut checking = false;
        let mut failures = 0u32;
        let mut control_open = true;
        loop {
            tokio::select! {
                biased;
                status = child.wait() => {
                    return Verdict::Failed("exited", match status {
                        Ok(status) => format!(
                            "it {} {} ms after it was ready",
                            sys::describe(status),
                            ready_at.elapsed().as_millis()
                        ),
                        Err(e) => format!("waiting for it failed: {e}"),
                    });
                }
                message = control.recv(), if control_open => match message {
                    Ok(Some(Message::Unhealthy(reason))) => {
                        return Verdict::Failed(
                            "unhealthy",
                            format!("it said it is unhealthy: {reason}"),
                        );
                    }
                    Ok(Some(other)) => debug!(?other, "control message on probation"),
                    // It closed the channel: it is exiting, which the wait
                    // above sees.
                    Ok(None) => control_open = false,
                    Err(e) => {
                        warn!(error = %e, "cannot read the new generation's control channel");
                        control_open = false;
                    }
                },
                _ = watch.stopping() => return Verdict::Stopped,
                result = &mut check, if checking => {
                    checking = false;
                    match result {
                        Ok(()) => {
                            if failures > 0 {
                                info!(pid, after_failures = failures, "health check passes again");
                            }
                            failures = 0;
                        }
                        Err(why) => {
                            failures += 1;
                            warn!(
                                pid,
                                failures,
                                threshold = options.health_threshold,
                                why,
                                "health check failed"
                            );
                            if failures >= options.health_threshold {
                                return Verdict::Failed(
                                    "health_check",
                                    format!("{failures} health checks failed in a row (last: {why})"),
                                );
                            }
                        }
                    }
                }
                () = &mut next_check, if !checking && health.is_some() => {
                    if let Some(health) = &health {
                        check = self.check(health, target, pid, generation);
                        checking = true;
                    }
                    next_check = Box::pin(tokio::time::sleep(options.health_interval));
                }
                () = &mut end => return Verdict::Promoted,
            }
        }
    }

    /// Where a health check connects: the first TCP listener's address, on
    /// loopback when it is bound to any address.
    fn health_address(&self) -> Option<SocketAddr> {
        let mut addr = lock(&self.inner.registry).first_tcp_address()?;
        match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => addr.set_ip(Ipv4Addr::LOCALHOST.into()),
            IpAddr::V6(ip) if ip.is_unspecified() => addr.set_ip(Ipv6Addr::LOCALHOST.into()),
            _ => {}
        }
        Some(addr)
    }

    /// One health check, bounded by the health timeout.
    fn check(
        &self,
        health: &Health,
        target: Option<SocketAddr>,
        pid: i32,
        generation: u64,
    ) -> BoxFuture<'static, Result<(), String>> {
        let timeout = self.inner.options.health_timeout;
        let health = health.clone();
        let exec = match &health {
            Health::Exec(command) => Some(self.probe_exec(command, pid, generation)),
            _ => None,
        };
        // The network checks are the supervisor's (`health::Probe`), aimed at
        // our first TCP listener.
        let network = target.map(|addr| {
            let (host, port) = (addr.ip().to_string(), addr.port());
            match &health {
                Health::Http(path) => Some(Probe::Http {
                    host,
                    port,
                    path: path.clone(),
                }),
                Health::Tcp => Some(Probe::Tcp { host, port }),
                Health::Exec(_) => None,
            }
        });
        async move {
            match (exec, network) {
                (Some(Ok(child)), _) => {
                    match tokio::time::timeout(timeout, wait_probe(child)).await {
                        Ok(result) => result,
                        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
                    }
                }
                (Some(Err(e)), _) => Err(e),
                (None, Some(Some(probe))) => probe.run(timeout).await,
                (None, _) => Err(NO_TCP.to_owned()),
            }
        }
        .boxed()
    }

    /// Starts `sh -c command` for an exec health check, in a process group
    /// of its own (killed with it when dropped).
    fn probe_exec(&self, command: &str, pid: i32, generation: u64) -> Result<Child, String> {
        let pid_text = pid.to_string();
        let generation_text = generation.to_string();
        let env = self
            .inner
            .env
            .iter()
            .filter(|(k, _)| k != "HANDOVER_PID" && k != "HANDOVER_GENERATION")
            .map(|(k, v)| (k.as_os_str(), v.as_os_str()))
            .chain([
                ("HANDOVER_PID".as_ref(), pid_text.as_ref()),
                ("HANDOVER_GENERATION".as_ref(), generation_text.as_ref()),
            ]);
        let exec = Exec::new(
            "/bin/sh".as_ref(),
            ["sh".as_ref(), "-c".as_ref(), command.as_ref()],
            env,
            false,
            None,
        )
        .map_err(|e| format!("cannot prepare the health command: {e}"))?
        .in_new_process_group();
        let started =
            sys::spawn(exec, &[]).map_err(|e| format!("cannot run the health command: {e}"))?;
        Ok(Child::new(started, true))
    }
}

/// Waits for an exec health check; a probe dropped at the timeout is killed
/// with its group.
async fn wait_probe(mut child: Child) -> Result<(), String> {
    match child.wait().await {
        Ok(status) if sys::exit_status(status).success() => Ok(()),
        Ok(status) => {
            let _ = sys::signal_group(child.pid(), Signal::SIGKILL);
            Err(format!("the health command {}", sys::describe(status)))
        }
        Err(e) => Err(format!("cannot wait for the health command: {e}")),
    }
}
