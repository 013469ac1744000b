//! The newsletter's other half: who must not be mailed again, and what became of what was sent.
//!
//! - The **suppression list** (`baton_suppressions`): one row per normalised address and scope
//!   (a job, or `*` for every job), with the reason ([`Reason`]), where it came from and when.
//!   Every newsletter run reads it in the statement that loads a page
//!   ([`crate::sql::statements::load_page`]); a suppressed recipient is `skipped` with the
//!   reason, never sent.
//! - **One-click unsubscribes** (RFC 8058): [`Engine::unsubscribe`] verifies the signed link of
//!   [`crate::mail::unsubscribe_url`] with the job's own secret and suppresses the address for
//!   that job. The HTTP side (Function URL, `baton serve`) is [`crate::inbound`].
//! - **SES events** (bounces, complaints, deliveries, from the configuration set through
//!   EventBridge): [`Engine::record_mail_event`] records each once per recipient
//!   (`baton_mail_events`), suppresses permanent bounces and complaints for every job, and
//!   suppresses an address whose transient bounces since its last delivery reach
//!   `settings.soft_bounce_limit`. Per-run counts come from the same rows.
//!
//! Every write is idempotent on its own (`ON CONFLICT DO NOTHING`, thresholds counted from the
//! recorded rows), so a replayed event, or a statement re-run after its answer was lost,
//! changes nothing more.

use serde::Serialize;

use super::{Engine, EngineError};
use crate::mail;
use crate::sql::{Record, SqlError, statements as st};

/// Why an address is suppressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A one-click (or confirmed) unsubscribe from one job's mail.
    Unsubscribed,
    /// SES reported a permanent bounce: the address does not exist.
    HardBounce,
    /// Transient bounces reached `settings.soft_bounce_limit` since the last delivery.
    SoftBounces,
    /// The recipient marked a message as spam.
    Complaint,
    /// An operator's `baton suppress add` or `import`.
    Manual,
}

impl Reason {
    pub const ALL: [Reason; 5] =
        [Reason::Unsubscribed, Reason::HardBounce, Reason::SoftBounces, Reason::Complaint, Reason::Manual];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unsubscribed => "unsubscribed",
            Reason::HardBounce => "hard_bounce",
            Reason::SoftBounces => "soft_bounces",
            Reason::Complaint => "complaint",
            Reason::Manual => "manual",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// The scope of a suppression that applies to every job.
pub const EVERY_JOB: &str = "*";

/// One row of the suppression list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Suppression {
    pub address: String,
    /// A job's name, or `*` for every job.
    pub scope: String,
    pub reason: String,
    /// Where it came from: `one-click`, `ses`, `cli`, `import`.
    pub source: String,
    pub detail: Option<String>,
    /// When it took effect (baton's clock).
    pub created_at_ms: i64,
    /// When it was lifted; `None` while it is in force.
    pub removed_at_ms: Option<i64>,
}

impl Suppression {
    fn from_record(r: Record<'_>) -> Result<Suppression, SqlError> {
        let text = |c: &str| r.text(c).map(Option::unwrap_or_default);
        Ok(Suppression {
            address: text("address")?,
            scope: text("scope")?,
            reason: text("reason")?,
            source: text("source")?,
            detail: r.text("detail")?,
            created_at_ms: r.int("created_at")?,
            removed_at_ms: r.opt_int("removed_at")?,
        })
    }
}

/// What an SES event says happened to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MailEventKind {
    Delivery,
    /// A permanent bounce: suppressed for every job.
    HardBounce,
    /// A transient (or undetermined) bounce: counted toward `settings.soft_bounce_limit`.
    SoftBounce,
    /// Suppressed for every job.
    Complaint,
}

impl MailEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MailEventKind::Delivery => "delivery",
            MailEventKind::HardBounce => "hard_bounce",
            MailEventKind::SoftBounce => "soft_bounce",
            MailEventKind::Complaint => "complaint",
        }
    }
}

/// One SES event, as [`crate::inbound`] reads it from EventBridge.
#[derive(Debug, Clone, PartialEq)]
pub struct MailEvent {
    /// Identifies the event across replays (SES's feedback id, or the message id for a delivery).
    pub key: String,
    pub kind: MailEventKind,
    /// The recipients it concerns, as SES reports them.
    pub recipients: Vec<String>,
    /// The run and job of the message, from its SES message tags (absent for mail baton did not send).
    pub run_id: Option<String>,
    pub job: Option<String>,
    /// A short reason (bounce type and diagnostic, complaint type), kept with the suppression.
    pub detail: Option<String>,
    /// When it happened (the event's own time, epoch ms): transient bounces count since the last delivery.
    pub at_ms: i64,
}

/// What recording an SES event did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MailEventReport {
    /// Recipients recorded for the first time.
    pub recorded: u32,
    /// Recipients already recorded (a replay): nothing more changed.
    pub replayed: u32,
    /// Suppressions this event added.
    pub suppressed: u32,
    /// Soft-bounce suppressions a late delivery event lifted (the bounces it followed no
    /// longer reach the limit).
    pub lifted: u32,
}

/// A run's SES events, for `baton status` and the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MailCounts {
    pub delivered: i64,
    pub hard_bounced: i64,
    pub soft_bounced: i64,
    pub complained: i64,
}

/// The answer to a one-click unsubscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsubscribe {
    /// The link is genuine; its address is suppressed for its job (now, or already).
    Recorded,
    /// Forged, truncated, signed with another secret, or for a job this deployment does not
    /// send: nothing recorded.
    Refused,
}

/// Rows per read of [`Engine::each_suppression`].
const SUPPRESSIONS_PER_READ: i64 = 1000;

/// Longest token part accepted before any work (an address is at most 254 octets; base64 of it
/// and the signature stay well under this).
const MAX_TOKEN_PART: usize = 1024;

impl Engine {
    /// Suppresses `address` for `scope` (a job or `*`). Returns how many rows are new (0 when it
    /// was already suppressed; an internationalised domain is kept in both its forms). A value
    /// that is not an address is refused and changes nothing.
    pub async fn suppress(
        &self,
        address: &str,
        scope: &str,
        reason: Reason,
        source: &str,
        detail: Option<&str>,
    ) -> Result<u32, EngineError> {
        self.suppress_all(&[address], scope, reason, source, detail).await
    }

    /// [`Self::suppress`] for many addresses, in statements of
    /// [`st::SUPPRESSIONS_PER_STATEMENT`]. Every address is checked first: one that is not an
    /// address refuses the lot, and nothing changes.
    pub async fn suppress_all(
        &self,
        addresses: &[&str],
        scope: &str,
        reason: Reason,
        source: &str,
        detail: Option<&str>,
    ) -> Result<u32, EngineError> {
        check_scope(scope)?;
        let mut keys: Vec<String> = Vec::with_capacity(addresses.len());
        for address in addresses {
            keys.extend(suppression_keys(address)?);
        }
        keys.sort_unstable();
        keys.dedup();
        let now = self.now_ms();
        let mut added = 0;
        for chunk in keys.chunks(st::SUPPRESSIONS_PER_STATEMENT) {
            let stmt = st::suppress_many(chunk, scope, reason.as_str(), source, detail, now);
            added += self.sql(stmt).await?.rows.len() as u32;
        }
        Ok(added)
    }

    /// Lifts `address`'s suppression for `scope`, or every one it has. Returns how many were
    /// lifted. Events from before the lifting, replayed later, do not bring it back.
    pub async fn unsuppress(&self, address: &str, scope: Option<&str>) -> Result<u32, EngineError> {
        let keys = suppression_keys(address)?;
        if let Some(scope) = scope {
            check_scope(scope)?;
        }
        let now = self.now_ms();
        let mut removed = 0;
        for key in keys {
            removed += self.sql(st::unsuppress(&key, scope, now)).await?.rows.len() as u32;
        }
        Ok(removed)
    }

    /// Up to `limit` suppressions after `after` (`(address, scope)`), in that order: those in
    /// force, or with `lifted_too` the lifted ones as well.
    pub async fn suppressions(
        &self,
        after: Option<(&str, &str)>,
        limit: i64,
        lifted_too: bool,
    ) -> Result<Vec<Suppression>, EngineError> {
        let rows = self.sql(st::suppressions(after, limit, lifted_too)).await?;
        Ok(rows.records().map(Suppression::from_record).collect::<Result<_, _>>()?)
    }

    /// Visits every suppression (in force, or with `lifted_too` every row) in `(address, scope)`
    /// order, read in keyset pages of [`SUPPRESSIONS_PER_READ`] rows, so a list of any length is
    /// read in bounded answers and never held whole.
    pub async fn each_suppression<E: From<EngineError>>(
        &self,
        lifted_too: bool,
        mut visit: impl FnMut(&Suppression) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut after: Option<(String, String)> = None;
        loop {
            let at = after.as_ref().map(|(a, s)| (a.as_str(), s.as_str()));
            let page = self.suppressions(at, SUPPRESSIONS_PER_READ, lifted_too).await?;
            for s in &page {
                visit(s)?;
            }
            match page.last() {
                Some(last) if page.len() as i64 == SUPPRESSIONS_PER_READ => {
                    after = Some((last.address.clone(), last.scope.clone()))
                }
                _ => return Ok(()),
            }
        }
    }

    /// The address a one-click link is for, if `r` and `sig` are genuine for job `list` (checked
    /// with that job's secret, in constant time). No database access: a GET can call it.
    pub fn verify_unsubscribe(&self, list: &str, r: &str, sig: &str) -> Option<String> {
        if r.len() > MAX_TOKEN_PART || sig.len() > MAX_TOKEN_PART {
            return None;
        }
        let list_shown = crate::text::printable_short(list);
        // A deployment that cannot verify its own links refuses every unsubscribe: say why.
        let Some(newsletter) = self.config().jobs.get(list).and_then(|j| j.newsletter.as_ref()) else {
            tracing::warn!(list = list_shown, "unsubscribe refused: no newsletter job of that name is configured");
            return None;
        };
        let Some(secret) = newsletter.secret() else {
            tracing::error!(
                list = list_shown,
                env = newsletter.unsubscribe_secret_env,
                "unsubscribe refused: the job's secret is not set"
            );
            return None;
        };
        let secret = secrecy::ExposeSecret::expose_secret(&secret);
        if let Err(why) = crate::config::check_secret(secret) {
            tracing::error!(list = list_shown, why, "unsubscribe refused: the job's secret is unusable");
            return None;
        }
        let verified = mail::verify_unsubscribe(secret, list, r, sig);
        if verified.is_none() {
            tracing::info!(list = list_shown, "unsubscribe refused: the link's signature does not verify");
        }
        verified
    }

    /// Records a one-click unsubscribe: suppresses the link's address for its job. A link that
    /// does not verify records nothing. Whether the address is (or was) a recipient is never
    /// looked up, so the answer cannot reveal it.
    pub async fn unsubscribe(&self, list: &str, r: &str, sig: &str) -> Result<Unsubscribe, EngineError> {
        let Some(address) = self.verify_unsubscribe(list, r, sig) else {
            return Ok(Unsubscribe::Refused);
        };
        match self.suppress(&address, list, Reason::Unsubscribed, "one-click", None).await {
            Ok(_) => Ok(Unsubscribe::Recorded),
            // A signed address that is not one (signed by a misconfigured sender): nothing to do.
            Err(EngineError::BadAddress { .. }) => Ok(Unsubscribe::Refused),
            Err(e) => Err(e),
        }
    }

    /// Records one SES event for each of its recipients and applies it: a permanent bounce or
    /// a complaint suppresses the address for every job; a transient bounce suppresses it once
    /// `settings.soft_bounce_limit` of them have come since its last delivery; a delivery lifts
    /// a transient-bounce suppression its late arrival disproves. Every recipient is checked
    /// before anything is written.
    ///
    /// Per recipient: record the event (once), apply its effect, mark it applied. A replay of an
    /// applied event changes nothing (so it cannot undo an operator's `suppress remove` made
    /// since); one whose first delivery stopped before the mark (a lost answer, a crash) applies
    /// it again, every effect being idempotent.
    pub async fn record_mail_event(&self, event: &MailEvent) -> Result<MailEventReport, EngineError> {
        let recipients: Vec<Vec<String>> =
            event.recipients.iter().map(|a| suppression_keys(a)).collect::<Result<_, _>>()?;
        let mut report = MailEventReport::default();
        let run = (event.run_id.as_deref(), event.job.as_deref());
        for keys in recipients {
            let address = &keys[0];
            let now = self.now_ms();
            let stmt = st::record_mail_event(
                &event.key,
                address,
                event.kind.as_str(),
                run,
                event.detail.as_deref(),
                event.at_ms,
                now,
            );
            let applied = if self.sql(stmt).await?.rows.is_empty() {
                report.replayed += 1;
                let rows = self.sql(st::mail_event_applied(&event.key, address)).await?;
                rows.first().map(|r| r.opt_int("applied_at")).transpose()?.flatten().is_some()
            } else {
                report.recorded += 1;
                false
            };
            if !applied {
                self.apply_mail_event(event, &keys, now, &mut report).await?;
                self.sql(st::mark_mail_event_applied(&event.key, address, now)).await?;
            }
        }
        Ok(report)
    }

    /// The effect of one event on one recipient's suppressions (each of its address forms).
    async fn apply_mail_event(
        &self,
        event: &MailEvent,
        keys: &[String],
        now: i64,
        report: &mut MailEventReport,
    ) -> Result<(), EngineError> {
        let limit = i64::from(self.config().settings.soft_bounce_limit);
        let (counted, detail) = (&keys[0], event.detail.as_deref());
        for key in keys {
            let stmt = match event.kind {
                MailEventKind::Delivery => st::lift_soft_bounce_suppression(counted, key, limit, now),
                MailEventKind::HardBounce => {
                    st::suppress(key, EVERY_JOB, Reason::HardBounce.as_str(), "ses", detail, now)
                }
                MailEventKind::Complaint => {
                    st::suppress(key, EVERY_JOB, Reason::Complaint.as_str(), "ses", detail, now)
                }
                MailEventKind::SoftBounce => st::suppress_after_soft_bounces(counted, key, limit, now),
            };
            let changed = self.sql(stmt).await?.rows.len() as u32;
            match event.kind {
                MailEventKind::Delivery => report.lifted += changed,
                _ => report.suppressed += changed,
            }
        }
        Ok(())
    }

    /// A run's deliveries, bounces and complaints as SES reported them.
    pub async fn mail_counts(&self, run_id: &str) -> Result<MailCounts, EngineError> {
        let rows = self.sql(st::mail_event_counts(run_id)).await?;
        let mut counts = MailCounts::default();
        for r in rows.records() {
            let n = r.int("n")?;
            match r.text("kind")?.as_deref() {
                Some("delivery") => counts.delivered = n,
                Some("hard_bounce") => counts.hard_bounced = n,
                Some("soft_bounce") => counts.soft_bounced = n,
                Some("complaint") => counts.complained = n,
                _ => {}
            }
        }
        Ok(counts)
    }
}

/// The forms an address is kept under, or why it is not an address.
pub fn suppression_keys(address: &str) -> Result<Vec<String>, EngineError> {
    mail::suppression_keys(address)
        .map_err(|why| EngineError::BadAddress { address: crate::text::printable_short(address), why })
}

/// Why `scope` cannot scope a suppression, if it cannot: a job name, or `*` for every job.
pub fn check_scope(scope: &str) -> Result<(), EngineError> {
    if scope == EVERY_JOB || crate::config::is_job_name(scope) {
        return Ok(());
    }
    Err(EngineError::BadAddress {
        address: crate::text::printable_short(scope),
        why: "a suppression's scope is a job name (letters, digits, `-`, `_`) or `*` for every job".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
        assert_eq!(Reason::parse("Unsubscribed"), None);
    }
}
