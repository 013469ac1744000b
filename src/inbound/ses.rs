//! SES events as EventBridge delivers them: the envelope (`version`, `id`, `detail-type`,
//! `source: aws.ses`, `time`, ...) around SES's event record (`eventType`, `mail`, and `bounce`,
//! `complaint` or `delivery`), as documented in the Amazon SES Developer Guide ("Monitoring SES
//! events using Amazon EventBridge"; the record's fields in "Contents of event data that Amazon
//! SES publishes").
//!
//! Only what baton acts on is read, and checked: a bounce (permanent, or transient and
//! undetermined), a complaint, a delivery. Other well-formed SES events (send, open, click, ...)
//! are accepted and ignored; anything malformed is refused with the reason, before any change.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::engine::suppression::{MailEvent, MailEventKind};

/// The most recipients one event may name (SES sends to at most 50 per message).
const MAX_RECIPIENTS: usize = 100;
/// Longest reason kept with a suppression.
const MAX_DETAIL: usize = 300;

#[derive(Deserialize)]
struct Envelope {
    source: String,
    #[serde(rename = "detail-type")]
    detail_type: String,
    #[serde(default)]
    time: Option<String>,
    detail: Detail,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Detail {
    #[serde(alias = "notificationType")]
    event_type: String,
    mail: Mail,
    #[serde(default)]
    bounce: Option<Bounce>,
    #[serde(default)]
    complaint: Option<Complaint>,
    #[serde(default)]
    delivery: Option<Delivery>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Mail {
    message_id: String,
    #[serde(default)]
    tags: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bounce {
    bounce_type: String,
    #[serde(default)]
    bounce_sub_type: Option<String>,
    bounced_recipients: Vec<Recipient>,
    #[serde(default)]
    timestamp: Option<String>,
    feedback_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Complaint {
    complained_recipients: Vec<Recipient>,
    #[serde(default)]
    timestamp: Option<String>,
    feedback_id: String,
    #[serde(default)]
    complaint_feedback_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Recipient {
    email_address: String,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    diagnostic_code: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Delivery {
    recipients: Vec<String>,
    #[serde(default)]
    timestamp: Option<String>,
}

/// Whether the payload claims to be an SES event from EventBridge (then it must read as one).
pub fn is_ses_event(payload: &serde_json::Value) -> bool {
    payload.get("source").and_then(|s| s.as_str()) == Some("aws.ses") && payload.get("detail-type").is_some()
}

/// The event baton acts on, `None` for an SES event it ignores, or why the payload is refused.
pub fn read(payload: &serde_json::Value) -> Result<Option<MailEvent>, String> {
    let envelope = Envelope::deserialize(payload).map_err(|e| format!("not an SES event from EventBridge: {e}"))?;
    if envelope.source != "aws.ses" {
        return Err(format!("`source` is {:?}, not \"aws.ses\"", envelope.source));
    }
    let d = envelope.detail;
    let tag = |name: &str| d.mail.tags.get(name).and_then(|v| v.first()).cloned();
    let run_id = tag("run_id").filter(|id| id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric()));
    let job = tag("job").filter(|job| crate::config::is_job_name(job));
    let missing = |what: &str| {
        format!("a {} event (detail-type {:?}) has no `detail.{what}`", d.event_type, envelope.detail_type)
    };
    let (kind, key, recipients, detail, timestamp) = match d.event_type.as_str() {
        "Bounce" => {
            let b = d.bounce.ok_or_else(|| missing("bounce"))?;
            let kind = match b.bounce_type.as_str() {
                "Permanent" => MailEventKind::HardBounce,
                "Transient" | "Undetermined" => MailEventKind::SoftBounce,
                other => {
                    return Err(format!(
                        "unknown bounceType {other:?} (expected Permanent, Transient or Undetermined)"
                    ));
                }
            };
            let first = b.bounced_recipients.first();
            let detail = format!(
                "{}/{}{}{}",
                b.bounce_type,
                b.bounce_sub_type.as_deref().unwrap_or("-"),
                first.and_then(|r| r.status.as_deref()).map(|s| format!(" {s}")).unwrap_or_default(),
                first.and_then(|r| r.diagnostic_code.as_deref()).map(|c| format!(": {c}")).unwrap_or_default(),
            );
            let recipients = b.bounced_recipients.into_iter().map(|r| r.email_address).collect();
            (kind, format!("bounce:{}", b.feedback_id), recipients, Some(detail), b.timestamp)
        }
        "Complaint" => {
            let c = d.complaint.ok_or_else(|| missing("complaint"))?;
            let detail = format!("complaint: {}", c.complaint_feedback_type.as_deref().unwrap_or("unspecified"));
            let recipients = c.complained_recipients.into_iter().map(|r| r.email_address).collect();
            (MailEventKind::Complaint, format!("complaint:{}", c.feedback_id), recipients, Some(detail), c.timestamp)
        }
        "Delivery" => {
            let del = d.delivery.ok_or_else(|| missing("delivery"))?;
            (MailEventKind::Delivery, format!("delivery:{}", d.mail.message_id), del.recipients, None, del.timestamp)
        }
        "Send" | "Reject" | "Open" | "Click" | "Rendering Failure" | "RenderingFailure" | "DeliveryDelay"
        | "Subscription" => return Ok(None),
        other => return Err(format!("unknown SES eventType {other:?}")),
    };
    if recipients.is_empty() || recipients.len() > MAX_RECIPIENTS {
        return Err(format!(
            "a {} event names {} recipients (1 to {MAX_RECIPIENTS} expected)",
            d.event_type,
            recipients.len()
        ));
    }
    for r in &recipients {
        crate::mail::suppression_keys(r).map_err(|why| format!("a recipient of the {} event: {why}", d.event_type))?;
    }
    let when = timestamp.or(envelope.time).ok_or_else(|| missing("timestamp"))?;
    let at: jiff::Timestamp = when.parse().map_err(|e| format!("the event time {when:?} is not RFC 3339: {e}"))?;
    Ok(Some(MailEvent {
        key,
        kind,
        recipients,
        run_id,
        job,
        detail: detail.map(|d| crate::text::printable_at_most(&d, MAX_DETAIL)),
        at_ms: at.as_millisecond(),
    }))
}
