//! Requests from outside baton's own chains, served by the same binary:
//!
//! - [`unsubscribe`]: the one-click unsubscribe endpoint (RFC 8058) over plain HTTP terms
//!   ([`HttpRequest`] in, [`HttpResponse`] out), so one handler serves a Lambda Function URL
//!   ([`function_url`]) and `baton serve` (axum, in the CLI) alike;
//! - [`ses`]: SES bounce, complaint and delivery events as EventBridge delivers them.
//!
//! In Lambda the payload's shape selects the handler ([`Inbound::classify`]), beside baton's own
//! `type`-tagged events. Every shape is checked before anything changes.

pub mod function_url;
pub mod ses;
pub mod unsubscribe;

pub use unsubscribe::{HttpRequest, HttpResponse};

/// What a Lambda payload is, by its shape.
pub enum Inbound {
    /// A Function URL request (payload format 2.0), or why its body cannot be read: always
    /// answered with an HTTP response.
    FunctionUrl(Result<HttpRequest, String>),
    /// An SES event from EventBridge (`"source": "aws.ses"`): the event, `None` for a
    /// well-formed event of a type baton does not act on (send, open, click, ...), or why it
    /// cannot be read.
    Ses(Result<Option<crate::engine::suppression::MailEvent>, String>),
    /// Anything else: one of baton's own events (or malformed, which its parser says).
    Baton,
}

impl Inbound {
    pub fn classify(payload: &serde_json::Value) -> Inbound {
        if let Some(request) = function_url::request(payload) {
            return Inbound::FunctionUrl(request);
        }
        if ses::is_ses_event(payload) {
            return Inbound::Ses(ses::read(payload));
        }
        Inbound::Baton
    }
}
