//! SIGINT, SIGTERM and SIGHUP as something each step of the recording can
//! wait on, so a Ctrl-C stops the workload and tears down what was set up
//! instead of killing the process with mounts, loop devices and a container
//! left behind. Once this exists the signals no longer end the process.

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, Signal, SignalKind};

pub struct Interrupt {
    signals: [(Signal, &'static str); 3],
}

impl Interrupt {
    pub fn new() -> Result<Self> {
        let on = |kind, name| -> Result<(Signal, &'static str)> {
            Ok((
                signal(kind).with_context(|| format!("handling {name}"))?,
                name,
            ))
        };
        Ok(Interrupt {
            signals: [
                on(SignalKind::interrupt(), "SIGINT")?,
                on(SignalKind::terminate(), "SIGTERM")?,
                on(SignalKind::hangup(), "SIGHUP")?,
            ],
        })
    }

    /// Waits for the next of the signals; returns its name.
    pub async fn recv(&mut self) -> &'static str {
        let [(int, a), (term, b), (hup, c)] = &mut self.signals;
        tokio::select! {
            _ = int.recv() => a,
            _ = term.recv() => b,
            _ = hup.recv() => c,
        }
    }
}
