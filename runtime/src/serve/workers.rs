//! The model workers behind the queues: one batcher per model ([`batch_loop`]: ONNX Runtime,
//! or tract on one thread or `--parallel ops`), or one worker per thread sharing the engine
//! ([`lane_loop`]); and [`infer`], which queues a request's images and waits for them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TrySendError};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::engine::{Engine, Scores};
use crate::serve::state::{Job, Shared, Slot};

/// What the workers of one model with lanes share: its queue, how many are running, and a
/// gate that a run over every thread holds alone and one-thread runs hold together.
#[derive(Debug)]
pub struct Lanes {
    pub rx: Mutex<Receiver<Job>>,
    pub busy: AtomicUsize,
    pub gate: RwLock<()>,
}

/// One worker of a model with lanes: takes queued requests one at a time until the queue
/// closes. A one-image request that finds nothing else queued and the other workers idle runs
/// over every thread, for its latency; otherwise each worker runs its image on its own thread,
/// beside the others. A request of several images runs over every thread, as a batch.
pub fn lane_loop(engine: &Engine, lanes: &Lanes, shared: &Shared, slot: usize, delay: Duration) {
    let slot = &shared.models[slot];
    loop {
        let job = {
            let Ok(rx) = lanes.rx.lock() else { return };
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let waiting = slot.queued.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        let others = lanes.busy.fetch_add(1, Ordering::SeqCst);
        let alone = job.images == 1 && (waiting > 0 || others > 0);
        let result = {
            // A poisoned gate only means another worker panicked while holding it.
            let _held = if alone {
                (
                    Some(lanes.gate.read().unwrap_or_else(|e| e.into_inner())),
                    None,
                )
            } else {
                (
                    None,
                    Some(lanes.gate.write().unwrap_or_else(|e| e.into_inner())),
                )
            };
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            engine.scores_shared(&job.pixels, job.images, alone)
        };
        lanes.busy.fetch_sub(1, Ordering::SeqCst);
        shared.metrics.batch(&slot.labels, job.images);
        let _ = job
            .reply
            .send(result.map_err(|e| format!("inference failed: {e:#}")));
    }
}

/// The one inference thread of a model: batches what is queued, up to `max_batch` images,
/// waiting at most `wait` for more after the first.
pub fn batch_loop(
    mut engine: Engine,
    rx: Receiver<Job>,
    shared: &Shared,
    slot: usize,
    (max_batch, wait): (usize, Duration),
    delay: Duration,
) {
    let slot = &shared.models[slot];
    let queued = &slot.queued;
    while let Ok(first) = rx.recv() {
        let deadline = Instant::now() + wait;
        let mut jobs = vec![first];
        let mut images = jobs[0].images;
        while images < max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) => {
                    images += j.images;
                    jobs.push(j);
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        queued.fetch_sub(jobs.len() as u64, Ordering::SeqCst);
        let mut pixels = Vec::with_capacity(jobs.iter().map(|j| j.pixels.len()).sum());
        for j in &jobs {
            pixels.extend_from_slice(&j.pixels);
        }
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        // A request larger than max_batch runs alone, in one go.
        let result = engine.scores(&pixels, images);
        shared.metrics.batch(&slot.labels, images);
        match result {
            Ok(scores) => {
                let mut first = 0;
                for j in jobs {
                    let _ = j.reply.send(Ok(scores.rows(first, j.images, images)));
                    first += j.images;
                }
            }
            Err(e) => {
                for j in jobs {
                    let _ = j.reply.send(Err(format!("inference failed: {e:#}")));
                }
            }
        }
    }
}

/// Queues `images` preprocessed images for `slot`'s model and waits for their outputs; an
/// error is (HTTP status, message).
pub fn infer(
    shared: &Shared,
    slot: &Slot,
    pixels: Vec<f32>,
    images: usize,
) -> Result<Scores, (u16, String)> {
    let (reply, answer) = mpsc::channel();
    let job = Job {
        pixels,
        images,
        reply,
    };
    let sent = match slot.jobs.lock() {
        Ok(jobs) => match jobs.as_ref() {
            Some(tx) => {
                slot.queued.fetch_add(1, Ordering::SeqCst);
                let r = tx.try_send(job);
                if r.is_err() {
                    slot.queued.fetch_sub(1, Ordering::SeqCst);
                }
                r
            }
            None => return Err((503, "shutting down".into())),
        },
        Err(_) => return Err((500, "internal error".into())),
    };
    match sent {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return Err((
                503,
                "the server is saturated (queue full); retry later".into(),
            ))
        }
        Err(TrySendError::Disconnected(_)) => return Err((503, "shutting down".into())),
    }
    match answer.recv_timeout(shared.timeout) {
        Ok(Ok(scores)) => Ok(scores),
        Ok(Err(e)) => Err((500, e)),
        Err(_) => Err((504, "timed out waiting for the model".into())),
    }
}
