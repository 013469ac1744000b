//! The Lambda payload: one serde-tagged enum whose `type` selects the role of the invocation.
//! Unknown types and unknown or missing fields are rejected before anything runs.

use serde::{Deserialize, Serialize};

/// Lambda's limit on an asynchronous invocation payload.
pub const MAX_ASYNC_PAYLOAD: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// Plan and start a run of `job` (from the schedule, or the CLI). The run key is `run_key`,
    /// or the period (`YYYY-MM`, in the job's `time_zone`) of `scheduled_time`, the RFC 3339
    /// time the schedule fired for (EventBridge Scheduler's `<aws.scheduler.scheduled-time>`):
    /// a schedule firing twice, or a start delivered hours late, cannot open a second run. A
    /// start event with neither is refused.
    Start {
        job: String,
        #[serde(default)]
        run_key: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scheduled_time: Option<String>,
    },
    /// Continue chain `chain` of run `run_id` with hop number `hop`.
    Hop {
        run_id: String,
        chain: u32,
        hop: u64,
        /// W3C trace context of the previous hop, linked from this hop's span.
        #[serde(default)]
        traceparent: Option<String>,
    },
    /// Find stuck chains and expired leases and restart them.
    Sweep {},
    /// Pause, resume or cancel a run.
    Control { run_id: String, action: ControlAction },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlAction {
    Pause,
    Resume,
    Cancel,
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error(
        "malformed event: {0}. Expected JSON with \"type\" one of start, hop, sweep, control, \
         e.g. {{\"type\":\"start\",\"job\":\"monthly-newsletter\"}} (or a Function URL request, or an SES \
         event from EventBridge)"
    )]
    Malformed(String),
    #[error("event is {size} bytes, over the 1 MB ({MAX_ASYNC_PAYLOAD} bytes) limit of an asynchronous invocation")]
    TooLarge { size: usize },
}

/// Longest run key accepted (a `YYYY-MM` month, a date, a short label).
pub const MAX_RUN_KEY: usize = 64;

/// Why a run key is refused, if it is: letters, digits, `-`, `_`, `.`, at most [`MAX_RUN_KEY`].
pub fn check_run_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("a run key cannot be empty".into());
    }
    if key.len() > MAX_RUN_KEY {
        return Err(format!("a run key has at most {MAX_RUN_KEY} characters, this one {}", key.len()));
    }
    if let Some(c) = key.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(*c))) {
        return Err(format!("{c:?} is not allowed: use letters, digits, `-`, `_` and `.` (e.g. 2026-12)"));
    }
    Ok(())
}

impl Event {
    pub fn parse(bytes: &[u8]) -> Result<Event, EventError> {
        if bytes.len() > MAX_ASYNC_PAYLOAD {
            return Err(EventError::TooLarge { size: bytes.len() });
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(EventError::Malformed("the payload is empty".into()));
        }
        let event: Event = serde_json::from_slice(bytes).map_err(|e| EventError::Malformed(e.to_string()))?;
        if let Event::Start { run_key: Some(key), .. } = &event {
            check_run_key(key).map_err(|why| EventError::Malformed(format!("`run_key`: {why}")))?;
        }
        Ok(event)
    }

    /// The payload for an asynchronous invocation: the JSON, refused if over Lambda's limit.
    pub fn to_payload(&self) -> Result<String, EventError> {
        let json = self.to_json();
        if json.len() > MAX_ASYNC_PAYLOAD {
            return Err(EventError::TooLarge { size: json.len() });
        }
        Ok(json)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("events always serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_event() {
        for e in [
            Event::Start { job: "j".into(), run_key: Some("2026-12".into()), scheduled_time: None },
            Event::Start { job: "j".into(), run_key: None, scheduled_time: Some("2026-11-30T23:00:00Z".into()) },
            Event::Hop { run_id: "r".into(), chain: 2, hop: 7, traceparent: None },
            Event::Sweep {},
            Event::Control { run_id: "r".into(), action: ControlAction::Cancel },
        ] {
            assert_eq!(Event::parse(e.to_json().as_bytes()).unwrap(), e);
        }
    }

    #[test]
    fn rejects_unknown_types_and_fields() {
        for bad in [
            r#"{"type":"explode"}"#,
            r#"{"type":"hop","run_id":"r","chain":1}"#,
            r#"{"type":"start","job":"j","surprise":1}"#,
            r#"{"job":"j"}"#,
            "not json",
            "",
            r#"{"type":"start","job":"j","run_key":"a b"}"#,
        ] {
            let err = Event::parse(bad.as_bytes()).unwrap_err();
            assert!(err.to_string().starts_with("malformed event"), "{bad}: {err}");
        }
    }
}
