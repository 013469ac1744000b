//! The embedded mail adapter: one RFC 5322 `.eml` file per accepted message in a folder, an
//! optional provider-side rate cap (like SES's maximum send rate: over it, sends are refused as
//! throttled), and injected faults. A message accepted twice is written twice, under a second
//! name, so duplicates are visible.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::faults::{Faults, dice};
use crate::ports::{MailError, Mailer, OutgoingMail};

pub struct Outbox {
    dir: PathBuf,
    faults: Faults,
    seed: u64,
    /// Failed sends per recipient, for the fault schedule (each attempt rolls its own dice). An
    /// address leaves the map once a send to it is accepted, so it holds only recipients being
    /// retried: memory stays flat however many recipients.
    attempts: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    writer: std::sync::mpsc::Sender<PendingWrite>,
    cap: Option<DefaultDirectRateLimiter>,
    pub accepted: Arc<AtomicU64>,
    /// CPU time the writer thread has spent, nanoseconds (the benchmark reports it apart: it
    /// is mostly the kernel creating files).
    pub writer_cpu_ns: Arc<AtomicU64>,
    /// Messages accepted whose caller was told the outcome is unknown (injected).
    pub ambiguous: Arc<AtomicU64>,
}

impl Outbox {
    /// `max_rate`: messages per second the "provider" accepts, if capped.
    /// The folder is created with the first message, so commands that send nothing leave no
    /// trace.
    pub fn new(dir: &Path, faults: Faults, seed: u64, max_rate: Option<f64>) -> std::io::Result<Self> {
        let writer_cpu_ns = Arc::new(AtomicU64::new(0));
        let cap = max_rate.filter(|r| *r > 0.0).map(|r| {
            let burst = std::num::NonZeroU32::new(r.ceil().max(1.0) as u32).expect("at least 1");
            RateLimiter::direct(
                Quota::with_period(Duration::from_secs_f64(1.0 / r)).expect("positive").allow_burst(burst),
            )
        });
        Ok(Self {
            dir: dir.to_owned(),
            faults,
            seed,
            attempts: Default::default(),
            writer: writer(dir.to_owned(), writer_cpu_ns.clone())?,
            writer_cpu_ns,
            cap,
            accepted: Arc::default(),
            ambiguous: Arc::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// One message for the writer thread, and where to say how it went.
struct PendingWrite {
    name: String,
    raw: Vec<u8>,
    done: tokio::sync::oneshot::Sender<std::io::Result<PathBuf>>,
}

/// The outbox's writer: one thread writing the files handed to it, in the order they come.
/// Cheaper than a blocking-pool task per message, and it batches by itself: while it writes,
/// the next messages queue. It ends when the outbox is dropped.
fn writer(dir: PathBuf, cpu_ns: Arc<AtomicU64>) -> std::io::Result<std::sync::mpsc::Sender<PendingWrite>> {
    let (tx, rx) = std::sync::mpsc::channel::<PendingWrite>();
    std::thread::Builder::new().name("baton-outbox".into()).spawn(move || {
        for w in rx {
            let _ = w.done.send(write_unique(&dir, &w.name, &w.raw));
            cpu_ns.store(thread_cpu_ns(), Ordering::Relaxed);
        }
    })?;
    Ok(tx)
}

/// This thread's CPU time so far, nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec it is given.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } == 0;
    if ok { t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64 } else { 0 }
}

/// Writes `raw` as `<name>.eml`, or `<name>.N.eml` if that exists; never overwrites.
fn write_unique(dir: &Path, name: &str, raw: &[u8]) -> std::io::Result<PathBuf> {
    let stem: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-@".contains(c) { c } else { '_' }).collect();
    for n in 1.. {
        let path = if n == 1 { dir.join(format!("{stem}.eml")) } else { dir.join(format!("{stem}.{n}.eml")) };
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                f.write_all(raw)?;
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && n == 1 && !dir.exists() => {
                std::fs::create_dir_all(dir)?;
                return write_unique(dir, name, raw);
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!()
}

#[async_trait]
impl Mailer for Outbox {
    async fn send(&self, mail: &OutgoingMail) -> Result<(), MailError> {
        let n = {
            let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
            let n = attempts.entry(mail.to.clone()).or_default();
            *n += 1;
            *n
        };
        let roll = dice(self.seed, &[b"mail", mail.to.as_bytes(), &n.to_le_bytes()]);
        let f = &self.faults;
        if roll < f.mail_transient {
            return Err(MailError::Transient("injected fault: connection reset before the request was sent".into()));
        }
        if roll < f.mail_transient + f.mail_throttle {
            return Err(MailError::Throttled("injected fault: maximum sending rate exceeded".into()));
        }
        if let Some(cap) = &self.cap
            && cap.check().is_err()
        {
            return Err(MailError::Throttled("maximum sending rate exceeded".into()));
        }
        let (done, written) = tokio::sync::oneshot::channel();
        let write = PendingWrite { name: mail.message_id.clone(), raw: mail.raw.clone(), done };
        self.writer.send(write).map_err(|_| MailError::Transient("the outbox writer has stopped".into()))?;
        written
            .await
            .map_err(|_| MailError::Transient("the outbox writer has stopped".into()))?
            .map_err(|e| MailError::Transient(format!("cannot write to the outbox: {e}")))?;
        self.accepted.fetch_add(1, Ordering::SeqCst);
        self.attempts.lock().unwrap_or_else(|e| e.into_inner()).remove(&mail.to);
        if roll < f.mail_transient + f.mail_throttle + f.mail_ambiguous {
            self.ambiguous.fetch_add(1, Ordering::SeqCst);
            return Err(MailError::Ambiguous(
                "injected fault: the request timed out after the message was accepted".into(),
            ));
        }
        Ok(())
    }
}

/// Reads every `.eml` in `dir` and returns the `To` address of each (tests and the demo use it
/// to check that nobody got a message twice).
pub fn recipients(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        other => other?,
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "eml") {
            // Only the header lines, up to the blank line: never a whole message in memory.
            let file = std::io::BufReader::new(std::fs::File::open(&path)?);
            let mut to = None;
            for line in std::io::BufRead::lines(file) {
                let line = line?;
                if line.is_empty() {
                    break;
                }
                if let Some(t) = line.strip_prefix("To: ") {
                    to = Some(t.to_owned());
                    break;
                }
            }
            if let Some(to) = to.as_deref() {
                let addr = match (to.rfind('<'), to.rfind('>')) {
                    (Some(a), Some(b)) if a < b => &to[a + 1..b],
                    _ => to,
                };
                out.push(addr.trim().to_owned());
            }
        }
    }
    Ok(out)
}
