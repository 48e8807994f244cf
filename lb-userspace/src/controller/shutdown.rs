//! The controller's way out: withdraw (for `dsrlb stop`), stop serving and probing, save the
//! state for the next controller, close the handles, and for `dsrlb stop`, remove the pins and
//! give the interface back to the next program.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::programs::ProgramFd;

use super::Controller;
use crate::{control::Sockets, dataplane};

/// How long the last answers on the control socket may take to be written before the process
/// exits anyway.
const REPLIES_WRITTEN_WITHIN: Duration = Duration::from_secs(2);

/// What is left to do once the controller's handles are closed.
struct Shutdown {
    /// `dsrlb stop`: the pins to remove.
    unpin: Option<PathBuf>,
    /// `dsrlb stop` with a next program: the interface goes back to it.
    hand_back: Option<HandBack>,
}

/// The next program, held open (the fd keeps it loaded) until the interface is given back.
struct HandBack {
    fd: ProgramFd,
    id: u32,
    interface: String,
    /// The balancer's attach mode, in which the next program gets the interface back.
    mode: Option<u32>,
}

impl Controller {
    /// Leaves the balancer forwarding from its pins, or, after `dsrlb stop`, detached.
    ///
    /// # Errors
    /// When `dsrlb stop` cannot remove the pins.
    pub(super) async fn shut_down(mut self, server: Sockets, metrics: Option<tokio::task::JoinHandle<()>>) -> anyhow::Result<()> {
        // `dsrlb stop` withdraws the VIPs and waits for the traffic to go before anything else.
        self.ha_shutdown().await;
        let replies = server.close();
        if let Some(m) = metrics {
            m.abort();
        }
        self.health.stop().await;
        let shutdown = Shutdown { unpin: self.stopping.then(|| self.opts.pin_dir.clone()), hand_back: self.hand_back() };
        if let Err(e) = self.save() {
            tracing::error!(error = %format!("{e:#}"), "saving the controller state failed");
        }
        // Our handles close here; the pins keep the attachment unless this is `dsrlb stop`.
        drop(self);
        let unpinned = shutdown.unpin.map_or(Ok(()), |dir| dataplane::unpin_all(&dir));
        if let (Ok(()), Some(h)) = (&unpinned, shutdown.hand_back) {
            h.give_back().await;
        }
        // The answers still on their way (`dsrlb stop`'s): the process's end would cut them off.
        // With the loop ended and the controller gone, every request is answered or refused by
        // now; only a client that does not read its answer can hold this up, for the bound.
        if !replies.written(REPLIES_WRITTEN_WITHIN).await {
            tracing::warn!("exiting with control-socket answers unwritten after {REPLIES_WRITTEN_WITHIN:?}");
        }
        unpinned
    }

    /// `dsrlb stop` gives the interface back to the next program, in the balancer's mode; the
    /// fd keeps it loaded until then.
    fn hand_back(&self) -> Option<HandBack> {
        let n = self.next.as_ref().filter(|_| self.stopping)?;
        dataplane::chain::program_fd(n.id)
            .map(|fd| HandBack {
                fd,
                id: n.id,
                interface: self.config.interface.clone(),
                mode: dataplane::chain::mode_flag_of(&self.config.interface),
            })
            .map_err(|e| tracing::error!(error = %format!("{e:#}"), "the next program cannot be given the interface back"))
            .ok()
    }
}

impl HandBack {
    /// Attaches the next program again; the kernel releases the unpinned link from a work
    /// queue, so the interface may be busy for a moment.
    async fn give_back(self) {
        let Self { fd, id, interface, mode: Some(mode) } = self else { return };
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match dataplane::chain::attach_fd(&interface, &fd, id, mode) {
                Ok(()) => {
                    tracing::info!(program = id, %interface, "the interface is back with the next program");
                    break;
                }
                Err(e) if Instant::now() < deadline && dataplane::chain::is_busy(&e) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), program = id, %interface, "giving the interface back to the next program failed");
                    break;
                }
            }
        }
    }
}
