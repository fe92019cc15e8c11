//! The lifecycle of a server that runs inside the test process (the token
//! server, the P2P tests' counting proxy and fake peers): a thread that
//! serves until asked to stop; Drop asks and joins it, so no thread outlives
//! its test.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a server thread sleeps between polls for work or for its stop
/// flag: short, so Drop returns promptly.
pub const POLL: Duration = Duration::from_millis(10);

pub struct ServerThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    /// Runs `serve` on a thread; it must return soon after the flag it is
    /// given turns true (poll it at least every [`POLL`] or so).
    pub fn spawn(serve: impl FnOnce(&AtomicBool) + Send + 'static) -> ServerThread {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || serve(&flag));
        ServerThread {
            stop,
            thread: Some(thread),
        }
    }

    /// Accepts connections on `listener` and hands each to `handle` on the
    /// server thread, until stopped.
    pub fn accept_loop(
        listener: TcpListener,
        mut handle: impl FnMut(TcpStream) + Send + 'static,
    ) -> ServerThread {
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        Self::spawn(move |stop| {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).expect("blocking stream");
                        handle(stream);
                    }
                    // WouldBlock (nothing to accept) or a failed accept: poll again.
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        })
    }
}

impl ServerThread {
    /// Asks the server to stop and waits until it has.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop();
    }
}
