//! A dedicated OS thread that owns libtorch state. tch tensors are `Send` but not `Sync`, and
//! compute must never block the async runtime, so the async side sends closures here and awaits
//! their results.

use std::sync::mpsc;
use std::thread::JoinHandle;

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

/// Owns a state `S` on its own thread; `call` runs a closure against it.
pub struct ComputeThread<S> {
    tx: Option<mpsc::Sender<Job<S>>>,
    handle: Option<JoinHandle<()>>,
}

impl<S> std::fmt::Debug for ComputeThread<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputeThread").finish_non_exhaustive()
    }
}

/// The compute thread is gone (its closure panicked).
#[derive(Debug, thiserror::Error)]
#[error("the compute thread stopped unexpectedly")]
pub struct ComputeGone;

impl<S: 'static> ComputeThread<S> {
    /// Starts the thread; `init` builds the state on it (so the state itself need not be `Send`).
    ///
    /// # Errors
    /// When the OS refuses the thread.
    pub fn spawn<F>(name: &str, init: F) -> std::io::Result<Self>
    where
        F: FnOnce() -> S + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Job<S>>();
        let handle = std::thread::Builder::new().name(name.into()).spawn(move || {
            let mut state = init();
            while let Ok(job) = rx.recv() {
                job(&mut state);
            }
        })?;
        Ok(Self {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    /// Runs `f` on the compute thread and awaits its result.
    ///
    /// # Errors
    /// [`ComputeGone`] when the thread has died.
    pub async fn call<R, F>(&self, f: F) -> Result<R, ComputeGone>
    where
        R: Send + 'static,
        F: FnOnce(&mut S) -> R + Send + 'static,
    {
        self.submit(f)?.await
    }

    /// Queues `f` on the compute thread now and returns its pending result. Unlike [`call`],
    /// whose future sends nothing until it is polled, several threads can be given work this
    /// way before any is awaited (replicas that wait for each other in a collective).
    ///
    /// # Errors
    /// [`ComputeGone`] when the thread has died (now, or before it replies).
    ///
    /// [`call`]: ComputeThread::call
    pub fn submit<R, F>(&self, f: F) -> Result<impl std::future::Future<Output = Result<R, ComputeGone>>, ComputeGone>
    where
        R: Send + 'static,
        F: FnOnce(&mut S) -> R + Send + 'static,
    {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job: Job<S> = Box::new(move |s| {
            let _ = reply.send(f(s));
        });
        self.tx
            .as_ref()
            .ok_or(ComputeGone)?
            .send(job)
            .map_err(|_| ComputeGone)?;
        Ok(async move { rx.await.map_err(|_| ComputeGone) })
    }
}

impl<S> Drop for ComputeThread<S> {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
