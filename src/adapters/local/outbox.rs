//! The embedded mail adapter: one RFC 5322 `.eml` file per accepted message in a folder, an
//! optional provider-side rate cap (like SES's maximum send rate: over it, sends are refused as
//! throttled), and injected faults. A message accepted twice is written twice, under a second
//! name, so duplicates are visible.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::faults::{Faults, dice};
use crate::ports::{MailError, Mailer, OutgoingMail};

pub struct Outbox {
    dir: PathBuf,
    faults: Faults,
    seed: u64,
    attempts: Mutex<HashMap<String, u64>>,
    cap: Option<DefaultDirectRateLimiter>,
    pub accepted: Arc<AtomicU64>,
    /// Messages accepted whose caller was told the outcome is unknown (injected).
    pub ambiguous: Arc<AtomicU64>,
}

impl Outbox {
    /// `max_rate`: messages per second the "provider" accepts, if capped.
    /// The folder is created with the first message, so commands that send nothing leave no
    /// trace.
    pub fn new(dir: &Path, faults: Faults, seed: u64, max_rate: Option<f64>) -> std::io::Result<Self> {
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
            attempts: Mutex::default(),
            cap,
            accepted: Arc::default(),
            ambiguous: Arc::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
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
        let (dir, name, raw) = (self.dir.clone(), mail.message_id.clone(), mail.raw.clone());
        tokio::task::spawn_blocking(move || write_unique(&dir, &name, &raw))
            .await
            .map_err(|e| MailError::Transient(format!("outbox writer failed: {e}")))?
            .map_err(|e| MailError::Transient(format!("cannot write to the outbox: {e}")))?;
        self.accepted.fetch_add(1, Ordering::SeqCst);
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
            let text = std::fs::read_to_string(&path)?;
            if let Some(to) = text.lines().find_map(|l| l.strip_prefix("To: ")) {
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
