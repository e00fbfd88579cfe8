//! [`EngineHandle`]: an [`Engine`] on a thread of its own, fed through a channel, for
//! callers on other threads (the server's request handlers).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{check_request, Engine, Event, Request, Shared, Sink, Stats};
use crate::error::{Error, Result};

enum Msg {
    Submit(Request, Sink),
    Stop,
}

/// An [`Engine`] running on its own thread: [`EngineHandle::submit`] from any thread, events
/// through each request's [`Sink`] (called on the engine's thread).
///
/// ```no_run
/// use std::sync::{mpsc, Arc};
/// use ngpt_runtime::engine::{Engine, EngineHandle, EngineOptions, Event, Request, SamplingParams};
/// use ngpt_runtime::plan::LoadedPlan;
/// let plan = Arc::new(LoadedPlan::load("out/nv-tiny".as_ref())?);
/// let engine = EngineHandle::spawn(move || Engine::cpu(plan, EngineOptions::new(8)))?;
/// let (tx, rx) = mpsc::channel();
/// let params = SamplingParams { max_tokens: 4, temperature: 0.0, ..SamplingParams::default() };
/// engine.submit(Request { prompt: vec![45, 64], params }, Box::new(move |e| tx.send(e).is_ok()))?;
/// let events: Vec<Event> = rx.iter().collect(); // four tokens, then Finished
/// assert!(matches!(events.last(), Some(Event::Finished { completion_tokens: 4, .. })));
/// # Ok::<(), ngpt_runtime::Error>(())
/// ```
pub struct EngineHandle {
    tx: Mutex<mpsc::Sender<Msg>>,
    shared: Arc<Shared>,
    accepting: AtomicBool,
    vocab: usize,
    capacity: usize,
    max_queue: usize,
    max_batch: usize,
    describe: String,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl EngineHandle {
    /// Makes the engine on a new thread (`make` runs there: an executor stays on the thread
    /// that made it), runs a warm-up request through it, and returns once that is done, or
    /// with `make`'s or the warm-up's error.
    pub fn spawn<F>(make: F) -> Result<EngineHandle>
    where
        F: FnOnce() -> Result<Engine> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Msg>();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("ngpt-engine".into())
            .spawn(move || {
                let made = make().and_then(|mut e| e.warm_up().map(|()| e));
                let engine = match made {
                    Ok(e) => e,
                    Err(err) => {
                        // The receiver waits for this; if it is gone there is nobody to tell.
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                let info = (
                    Arc::clone(&engine.shared),
                    engine.vocab(),
                    engine.capacity(),
                    engine.opts.max_queue,
                    engine.opts.max_batch,
                    engine.describe(),
                );
                if ready_tx.send(Ok(info)).is_ok() {
                    run(engine, rx);
                }
            })
            .map_err(|source| Error::Io {
                path: "engine thread".into(),
                source,
            })?;
        let (shared, vocab, capacity, max_queue, max_batch, describe) =
            ready_rx.recv().map_err(|_| Error::Request {
                what: "engine".into(),
                problem: "the engine thread ended while starting".into(),
            })??;
        Ok(EngineHandle {
            tx: Mutex::new(tx),
            shared,
            accepting: AtomicBool::new(true),
            vocab,
            capacity,
            max_queue,
            max_batch,
            describe,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Checks and queues a request ([`Engine::check`]'s rules; [`Error::QueueFull`] when
    /// `max_queue` requests wait; [`Error::ShuttingDown`] once draining). Its events come
    /// through `sink`, on the engine's thread.
    pub fn submit(&self, req: Request, sink: Sink) -> Result<()> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        check_request(&req, self.vocab, self.capacity)?;
        let limit = self.max_queue;
        self.shared
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (w < limit).then_some(w + 1)
            })
            .map_err(|_| Error::QueueFull { limit })?;
        let sent = self
            .tx
            .lock()
            .map_err(|_| Error::ShuttingDown)?
            .send(Msg::Submit(req, sink));
        if sent.is_err() {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::ShuttingDown);
        }
        Ok(())
    }

    /// The engine's load now.
    pub fn stats(&self) -> Stats {
        Stats {
            running: self.shared.running.load(Ordering::Relaxed),
            waiting: self.shared.waiting.load(Ordering::Relaxed),
            max_batch: self.max_batch,
        }
    }

    /// The plan's vocabulary.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Tokens a sequence holds: prompt + max_tokens stay within it.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// One line naming the executor.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Whether it still takes requests (not draining).
    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    /// Stops taking requests, lets the running and waiting ones finish for at most
    /// `deadline`, then cancels what is left and stops the thread.
    pub fn drain(&self, deadline: Duration) {
        self.accepting.store(false, Ordering::SeqCst);
        let t0 = Instant::now();
        while t0.elapsed() < deadline {
            let s = self.stats();
            if s.running == 0 && s.waiting == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop();
    }

    fn stop(&self) {
        if let Ok(tx) = self.tx.lock() {
            // An engine thread that already ended has nothing to stop.
            let _ = tx.send(Msg::Stop);
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            // A panic there was already reported to its requests (see `run`).
            let _ = t.join();
        }
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        self.accepting.store(false, Ordering::SeqCst);
        self.stop();
    }
}

/// The engine thread: take what was submitted (waiting for it when idle), run a step,
/// until told to stop or every handle is gone. A panic inside a step (a bug) fails the
/// requests it held and the engine goes on with an empty batch.
fn run(mut engine: Engine, rx: mpsc::Receiver<Msg>) {
    loop {
        let first = if engine.is_idle() {
            match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => break,
            }
        } else {
            None
        };
        let mut stop = false;
        for m in first
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()))
        {
            match m {
                Msg::Submit(req, sink) => {
                    engine.enqueue(req, sink);
                }
                Msg::Stop => stop = true,
            }
        }
        if stop {
            engine.cancel_all();
            break;
        }
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.step()));
        if let Err(panic) = stepped {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            engine.fail_all(Error::Request {
                what: "engine".into(),
                problem: format!("internal error in a step: {why}"),
            });
        }
    }
}

impl Engine {
    /// Runs one short greedy request through every program the engine uses (a prompt of
    /// two tokens, then two decode steps), so the first real request meets warm caches,
    /// compiled kernels and captured graphs.
    pub fn warm_up(&mut self) -> Result<()> {
        let failed: Arc<Mutex<Option<Arc<Error>>>> = Arc::default();
        let seen = Arc::clone(&failed);
        let req = Request {
            prompt: vec![0; 2.min(self.capacity().saturating_sub(2)).max(1)],
            params: super::SamplingParams {
                max_tokens: 2.min(self.capacity().saturating_sub(1)).max(1),
                temperature: 0.0,
                ignore_eos: true,
                ..super::SamplingParams::default()
            },
        };
        self.submit(
            req,
            Box::new(move |e| {
                if let Event::Failed(err) = e {
                    if let Ok(mut f) = seen.lock() {
                        *f = Some(err);
                    }
                }
                true
            }),
        )?;
        while self.step() {}
        let err = failed.lock().ok().and_then(|mut f| f.take());
        match err {
            None => Ok(()),
            Some(e) => Err(Error::Request {
                what: "warm-up".into(),
                problem: e.to_string(),
            }),
        }
    }

    /// Ends every request with [`Event::Failed`] carrying `err`.
    pub(crate) fn fail_all(&mut self, err: Error) {
        let err = Arc::new(err);
        for mut s in self.take_all() {
            (s.sink)(Event::Failed(Arc::clone(&err)));
        }
    }
}
