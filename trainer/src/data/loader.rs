//! A batch loader: worker threads decode and transform samples ahead of the model, and
//! batches come out in order whatever the threads' timing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use mae_models::preprocess::PreprocessSpec;

use super::transform::{eval_transform, train_transform, TrainAug};
use super::Dataset;
use crate::rng::Rng;

/// One batch, ready for the model.
#[derive(Debug)]
pub struct Batch {
    /// Row-major `[b, 3, s, s]`.
    pub pixels: Vec<f32>,
    pub labels: Vec<Vec<i64>>,
    pub indices: Vec<usize>,
}

/// What the workers do to each sample.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub spec: PreprocessSpec,
    /// `Some` for training: augmentation; `None`: the evaluation transform.
    pub aug: Option<TrainAug>,
    /// Random erasing probability applied after the training transform.
    pub reprob: f64,
    pub batch_size: usize,
    pub drop_last: bool,
    pub workers: usize,
    pub seed: u64,
    pub epoch: u64,
}

/// Iterator over the batches of `order`.
pub struct Loader {
    rx: Receiver<(usize, anyhow::Result<Batch>)>,
    pending: BTreeMap<usize, anyhow::Result<Batch>>,
    next: usize,
    total: usize,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Loader({}/{} batches)", self.next, self.total)
    }
}

impl Loader {
    /// Starts the workers over the samples `order` (indices into `ds`).
    pub fn new(ds: Arc<Dataset>, order: Vec<usize>, cfg: LoaderConfig) -> Self {
        let bs = cfg.batch_size.max(1);
        let total = if cfg.drop_last {
            order.len() / bs
        } else {
            order.len().div_ceil(bs)
        };
        let workers_n = cfg.workers.max(1);
        let (tx, rx) = sync_channel(workers_n * 2);
        let counter = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(order);
        let cfg = Arc::new(cfg);
        let workers = (0..workers_n)
            .map(|_| {
                let (tx, counter, order, ds, cfg) = (
                    tx.clone(),
                    counter.clone(),
                    order.clone(),
                    ds.clone(),
                    cfg.clone(),
                );
                std::thread::spawn(move || loop {
                    let b = counter.fetch_add(1, Ordering::SeqCst);
                    if b >= total {
                        return;
                    }
                    let idx = &order[b * bs..((b + 1) * bs).min(order.len())];
                    if tx.send((b, make_batch(&ds, idx, &cfg))).is_err() {
                        return;
                    }
                })
            })
            .collect();
        Self {
            rx,
            pending: BTreeMap::new(),
            next: 0,
            total,
            workers,
        }
    }

    /// Number of batches this loader yields.
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

fn make_batch(ds: &Dataset, idx: &[usize], cfg: &LoaderConfig) -> anyhow::Result<Batch> {
    let s = cfg.spec.input_size;
    let mut pixels = Vec::with_capacity(idx.len() * 3 * s * s);
    let mut labels = Vec::with_capacity(idx.len());
    for &i in idx {
        let item = &ds.items[i];
        // The input layer's errors name the file.
        let img = item.image()?;
        let v = match &cfg.aug {
            Some(aug) => {
                let mut rng = Rng::derive(&[cfg.seed, cfg.epoch, i as u64]);
                let mut v = train_transform(&img, &cfg.spec, aug, &mut rng);
                crate::data::erasing::random_erase(&mut v, s, cfg.reprob, &mut rng);
                v
            }
            None => eval_transform(&img, &cfg.spec),
        };
        pixels.extend_from_slice(&v);
        labels.push(item.labels.clone());
    }
    Ok(Batch {
        pixels,
        labels,
        indices: idx.to_vec(),
    })
}

impl Iterator for Loader {
    type Item = anyhow::Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            return None;
        }
        loop {
            if let Some(b) = self.pending.remove(&self.next) {
                self.next += 1;
                return Some(b);
            }
            match self.rx.recv() {
                Ok((i, b)) => {
                    self.pending.insert(i, b);
                }
                Err(_) => {
                    self.next = self.total;
                    return Some(Err(anyhow::anyhow!(
                        "data loader workers stopped unexpectedly"
                    )));
                }
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Unblock workers waiting to send, then wait for them.
        while self.rx.try_recv().is_ok() {}
        let workers = std::mem::take(&mut self.workers);
        drop(std::mem::replace(&mut self.rx, sync_channel(0).1));
        for w in workers {
            let _ = w.join();
        }
    }
}
