//! The outbox of one `--forward AE@HOST:PORT` or `--forward-stow URL`: results wait as files in
//! `SPOOL/outbox/<destination>/` (written atomically) until the destination stores them, so
//! they survive a restart or a crash of mae-run. One thread per destination sends what is due
//! on one association (or in one STOW-RS request), and retries a failure with exponential back-off
//! (`--forward-retry-first-s` doubling up to `--forward-retry-max-s`); a result still unsent
//! `--forward-give-up-s` after it was queued is moved to `failed/` beside it and the audit log
//! says why.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use serde_json::json;
use tracing::{info, warn};

use super::dimse;
use super::scu::{self, Client, Instance, Peer, Timeouts};
use super::spool::{clear_partial, dicom_files, sync_dir, write_atomic};
use super::stow::{self, StowUrl};
use super::Events;

/// Where an outbox sends: a DICOM node by C-STORE, or a DICOMweb server by STOW-RS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Dimse(Peer),
    Stow(StowUrl),
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Dimse(p) => p.fmt(f),
            Destination::Stow(u) => u.fmt(f),
        }
    }
}

/// How failed sends are retried.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub first: Duration,
    pub max: Duration,
    pub give_up: Duration,
}

impl Retry {
    /// The wait after the `attempts`-th failure.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let k = attempts.saturating_sub(1).min(30);
        self.first.saturating_mul(1 << k).min(self.max)
    }
}

/// Results sent at most per association.
const BATCH: usize = 64;

/// The outbox of one destination.
#[derive(Debug)]
pub struct Outbox {
    pub peer: Destination,
    pub dir: PathBuf,
    wake: Mutex<Sender<()>>,
}

/// The outbox folder of `peer` under the spool `spool`.
pub fn outbox_dir(spool: &Path, peer: &Destination) -> PathBuf {
    spool.join("outbox").join(folder_name(peer))
}

/// What waits in a folder of DICOM files: how many, and how long the oldest has waited (by
/// its modification time: when it was queued).
pub fn backlog(dir: &Path) -> (usize, Duration) {
    let files = dicom_files(dir).unwrap_or_default();
    let now = SystemTime::now();
    let oldest = files
        .iter()
        .filter_map(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
        .filter_map(|t| now.duration_since(t).ok())
        .max()
        .unwrap_or_default();
    (files.len(), oldest)
}

/// The folder name of a destination: its AE title, host and port (or `stow_`, host, port and
/// path), other characters as `_`.
fn folder_name(peer: &Destination) -> String {
    match peer {
        Destination::Dimse(p) => format!("{}@{}_{}", p.ae, p.host, p.port),
        Destination::Stow(u) => format!("stow_{}_{}{}", u.host, u.port, u.path),
    }
    .chars()
    .map(|c| {
        if c.is_ascii_alphanumeric() || "@._-".contains(c) {
            c
        } else {
            '_'
        }
    })
    .collect()
}

impl Outbox {
    /// Opens the outbox of `peer` under `spool/outbox/` and starts its sender, calling as
    /// `calling`.
    pub fn start(
        spool: &Path,
        peer: Destination,
        calling: String,
        retry: Retry,
        events: Arc<dyn Events>,
    ) -> anyhow::Result<Arc<Self>> {
        let dir = outbox_dir(spool, &peer);
        fs::create_dir_all(dir.join("failed"))
            .with_context(|| format!("cannot create the outbox {}", dir.display()))?;
        clear_partial(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
        let waiting = dicom_files(&dir)?.len();
        if waiting > 0 {
            info!("outbox {peer}: {waiting} result(s) waiting from before");
        }
        let (tx, rx) = mpsc::channel();
        let outbox = Arc::new(Self {
            peer,
            dir,
            wake: Mutex::new(tx),
        });
        let sender = Dispatcher {
            outbox: outbox.clone(),
            calling,
            retry,
            events,
            tries: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("dicom-outbox".into())
            .spawn(move || sender.run(rx))?;
        Ok(outbox)
    }

    /// Queues a result (a whole DICOM file) durably and wakes the sender.
    pub fn put(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        write_atomic(&self.dir, name, bytes)?;
        if let Ok(w) = self.wake.lock() {
            let _ = w.send(());
        }
        Ok(())
    }
}

/// The sending thread of an outbox.
struct Dispatcher {
    outbox: Arc<Outbox>,
    calling: String,
    retry: Retry,
    events: Arc<dyn Events>,
    /// Failed files: (attempts, when to try again).
    tries: HashMap<PathBuf, (u32, Instant)>,
}

impl Dispatcher {
    fn run(mut self, wake: Receiver<()>) {
        loop {
            let files = match dicom_files(&self.outbox.dir) {
                Ok(f) => f,
                Err(e) => {
                    warn!(
                        "outbox {}: cannot read {}: {e}",
                        self.outbox.peer,
                        self.outbox.dir.display()
                    );
                    Vec::new()
                }
            };
            self.tries.retain(|p, _| files.contains(p));
            let now = Instant::now();
            let due: Vec<PathBuf> = files
                .into_iter()
                .filter(|p| self.tries.get(p).is_none_or(|(_, at)| *at <= now))
                .take(BATCH)
                .collect();
            if !due.is_empty() {
                self.send(&due);
                continue;
            }
            let wait = self
                .tries
                .values()
                .map(|(_, at)| at.saturating_duration_since(Instant::now()))
                .min()
                .unwrap_or(Duration::from_secs(60))
                .min(Duration::from_secs(60));
            match wake.recv_timeout(wait) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => while wake.try_recv().is_ok() {},
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Sends `due` on one association, or in one STOW-RS request.
    fn send(&mut self, due: &[PathBuf]) {
        let mut items = Vec::new();
        for p in due {
            match fs::read(p)
                .map_err(anyhow::Error::from)
                .and_then(|b| Instance::from_file(&b))
            {
                Ok(i) => items.push((p.clone(), i)),
                Err(e) => self.give_up(p, &format!("unreadable: {e:#}")),
            }
        }
        if items.is_empty() {
            return;
        }
        let peer = match &self.outbox.peer {
            Destination::Dimse(peer) => peer.clone(),
            Destination::Stow(url) => {
                let url = url.clone();
                return self.post(&url, &items);
            }
        };
        let contexts = scu::contexts_for(items.iter().map(|(_, i)| i));
        let mut client = match Client::open(&peer, &self.calling, &contexts, Timeouts::default()) {
            Ok(c) => c,
            Err(e) => {
                let why = format!("{e:#}");
                for (p, _) in &items {
                    self.failed(p, &why);
                }
                return;
            }
        };
        let mut broken: Option<String> = None;
        for (p, inst) in &items {
            if let Some(why) = &broken {
                self.failed(p, why);
                continue;
            }
            match client.store(inst) {
                Ok(rsp) if dimse::status::stored(rsp.status) => self.sent(p, inst, rsp.status),
                Ok(rsp) => self.failed(
                    p,
                    &format!(
                        "status {:#06x}{}",
                        rsp.status,
                        rsp.comment.map(|c| format!(": {c}")).unwrap_or_default()
                    ),
                ),
                Err(e) => {
                    let why = format!("{e:#}");
                    self.failed(p, &why);
                    broken = Some(why);
                }
            }
        }
        if broken.is_none() {
            if let Err(e) = client.release() {
                warn!("outbox {}: {e:#}", self.outbox.peer);
            }
        }
    }

    /// Posts `items` to a DICOMweb server in one STOW-RS request.
    fn post(&mut self, url: &StowUrl, items: &[(PathBuf, Instance)]) {
        let files: Vec<Vec<u8>> = items
            .iter()
            .map(|(p, _)| fs::read(p).unwrap_or_default())
            .collect();
        let refs: Vec<&[u8]> = files.iter().map(Vec::as_slice).collect();
        match stow::post(url, &refs, Duration::from_secs(60)) {
            Ok(outcomes) => {
                for ((p, inst), failure) in items.iter().zip(outcomes) {
                    match failure {
                        None => self.sent(p, inst, 0),
                        Some(why) => self.failed(p, &why),
                    }
                }
            }
            Err(e) => {
                let why = format!("{e:#}");
                for (p, _) in items {
                    self.failed(p, &why);
                }
            }
        }
    }

    fn sent(&mut self, path: &Path, inst: &Instance, status: u16) {
        let attempts = self.tries.remove(path).map_or(1, |(n, _)| n + 1);
        if let Err(e) = fs::remove_file(path).and_then(|()| sync_dir(&self.outbox.dir)) {
            warn!(
                "outbox {}: sent {} but cannot remove it: {e}",
                self.outbox.peer,
                path.display()
            );
        }
        info!("outbox {}: sent {}", self.outbox.peer, inst.sop_instance);
        self.events.record(json!({
            "event": "dicom-sent",
            "destination": self.outbox.peer.to_string(),
            "sop_class_uid": inst.sop_class,
            "sop_instance_uid": inst.sop_instance,
            "status": status,
            "attempts": attempts,
        }));
    }

    /// Counts a failed attempt: retry later, or give up past `--forward-give-up-s`.
    fn failed(&mut self, path: &Path, why: &str) {
        let age = fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        if age >= self.retry.give_up {
            self.give_up(path, why);
            return;
        }
        let attempts = self.tries.get(path).map_or(0, |(n, _)| *n) + 1;
        let wait = self.retry.backoff(attempts);
        warn!(
            "outbox {}: {} not sent (attempt {attempts}): {why}; retrying in {}s",
            self.outbox.peer,
            path.file_name().unwrap_or_default().to_string_lossy(),
            wait.as_secs_f32()
        );
        self.tries
            .insert(path.to_path_buf(), (attempts, Instant::now() + wait));
    }

    fn give_up(&mut self, path: &Path, why: &str) {
        let attempts = self.tries.remove(path).map_or(1, |(n, _)| n + 1);
        let name = path.file_name().unwrap_or_default();
        let to = self.outbox.dir.join("failed").join(name);
        let moved = fs::rename(path, &to).and_then(|()| sync_dir(&self.outbox.dir));
        if let Err(e) = moved {
            warn!(
                "outbox {}: cannot move {} to failed/: {e}",
                self.outbox.peer,
                path.display()
            );
        }
        warn!(
            "outbox {}: gave up on {} after {attempts} attempt(s): {why}",
            self.outbox.peer,
            name.to_string_lossy()
        );
        self.events.record(json!({
            "event": "dicom-given-up",
            "destination": self.outbox.peer.to_string(),
            "file": to.display().to_string(),
            "attempts": attempts,
            "reason": why,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let r = Retry {
            first: Duration::from_secs(2),
            max: Duration::from_secs(60),
            give_up: Duration::from_secs(3600),
        };
        let got: Vec<u64> = (1..=7).map(|n| r.backoff(n).as_secs()).collect();
        assert_eq!(got, [2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(r.backoff(1000).as_secs(), 60);
    }
}
