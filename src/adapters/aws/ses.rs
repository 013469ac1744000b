//! The mail port on SES v2 (`SendEmail` with the message as Raw content, so the unsubscribe
//! headers go out exactly as built).
//!
//! SES has no idempotency token, so the SDK's own retries are disabled for this client (a retry
//! after a timeout could deliver twice) and every error is classified here, once:
//!
//! | SES says | [`MailError`] | the engine then |
//! |---|---|---|
//! | `TooManyRequestsException`, `LimitExceededException` "Maximum sending rate exceeded" | `Throttled` | backs off, retries |
//! | daily quota exceeded, `SendingPausedException`, `AccountSuspendedException` | `AccountStopped` | pauses the run, says why |
//! | `MessageRejected`, `BadRequestException`, `MailFromDomainNotVerifiedException`, `NotFoundException` | `Permanent` | fails the item |
//! | could not connect (nothing was sent) | `Transient` | retries |
//! | timeout, 5xx or broken response after the request left | `Ambiguous` | `unknown` (at-most-once) |

use async_trait::async_trait;
use aws_sdk_sesv2::config::http::HttpResponse;
use aws_sdk_sesv2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sesv2::operation::send_email::SendEmailError;
use aws_sdk_sesv2::primitives::Blob;
use aws_sdk_sesv2::types::{Destination, EmailContent, MessageTag, RawMessage};

use crate::ports::{MailError, Mailer, OutgoingMail};

pub struct SesMailer {
    client: aws_sdk_sesv2::Client,
    configuration_set: Option<String>,
}

impl SesMailer {
    /// Wraps a client; see [`SesMailer::client_config`] for how it should be configured.
    pub fn new(client: aws_sdk_sesv2::Client, configuration_set: Option<String>) -> Self {
        Self { client, configuration_set }
    }

    /// A client from the shared AWS config, with SDK retries off (see the module docs).
    pub fn client_from(shared: &aws_config::SdkConfig) -> aws_sdk_sesv2::Client {
        let config = aws_sdk_sesv2::config::Builder::from(shared)
            .retry_config(aws_sdk_sesv2::config::retry::RetryConfig::disabled())
            .build();
        aws_sdk_sesv2::Client::from_conf(config)
    }

    /// The account's maximum send rate (`GetAccount` → `SendQuota.MaxSendRate`), to cap a run's
    /// configured rate at start. `None` when SES does not say.
    pub async fn max_send_rate(&self) -> Result<Option<f64>, MailError> {
        let account = self.client.get_account().send().await.map_err(|e| classify_any(&e))?;
        if !account.sending_enabled() {
            return Err(MailError::AccountStopped("sending is disabled for this SES account".into()));
        }
        Ok(account.send_quota().map(|q| q.max_send_rate()).filter(|r| *r > 0.0))
    }
}

/// SES tag names and values allow `[A-Za-z0-9_-]` only; everything else becomes `_`.
pub fn sanitize_tag(s: &str) -> String {
    let out: String =
        s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
    let mut out: String = out.chars().take(256).collect();
    if out.is_empty() {
        out.push('_');
    }
    out
}

#[async_trait]
impl Mailer for SesMailer {
    async fn send(&self, mail: &OutgoingMail) -> Result<(), MailError> {
        let raw = RawMessage::builder()
            .data(Blob::new(mail.raw.clone()))
            .build()
            .map_err(|e| MailError::Permanent(format!("cannot build the raw message: {e}")))?;
        let tags = mail
            .tags
            .iter()
            .map(|(k, v)| MessageTag::builder().name(sanitize_tag(k)).value(sanitize_tag(v)).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| MailError::Permanent(format!("cannot build message tags: {e}")))?;
        self.client
            .send_email()
            .from_email_address(&mail.from)
            .destination(Destination::builder().to_addresses(&mail.to).build())
            .content(EmailContent::builder().raw(raw).build())
            .set_configuration_set_name(self.configuration_set.clone())
            .set_email_tags(if tags.is_empty() { None } else { Some(tags) })
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify(&e))
    }

    async fn max_rate(&self) -> Result<Option<f64>, MailError> {
        self.max_send_rate().await
    }
}

fn is_quota(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("daily") || m.contains("quota")
}

/// Classifies a `SendEmail` error (see the module docs for the table).
pub fn classify(e: &SdkError<SendEmailError, HttpResponse>) -> MailError {
    match e {
        SdkError::ServiceError(service) => {
            let err = service.err();
            // `Display` carries the modelled message; the metadata's is empty for modelled errors
            // built without a response.
            let described = err.to_string();
            let message = err.message().map(str::to_owned).unwrap_or_else(|| described.clone());
            let code = err.code().unwrap_or("unknown");
            match err {
                SendEmailError::TooManyRequestsException(_) | SendEmailError::LimitExceededException(_) => {
                    if is_quota(&message) {
                        MailError::AccountStopped(format!("the SES daily sending quota is spent ({described})"))
                    } else {
                        MailError::Throttled(described)
                    }
                }
                SendEmailError::SendingPausedException(_) => MailError::AccountStopped(format!(
                    "SES sending is paused for this account or configuration set ({described}); re-enable it, then `baton resume`"
                )),
                SendEmailError::AccountSuspendedException(_) => {
                    MailError::AccountStopped(format!("the SES account is suspended ({described})"))
                }
                SendEmailError::MessageRejected(_)
                | SendEmailError::BadRequestException(_)
                | SendEmailError::MailFromDomainNotVerifiedException(_)
                | SendEmailError::NotFoundException(_) => MailError::Permanent(described),
                _ => classify_unmodelled(code, &described, Some(service.raw().status().as_u16())),
            }
        }
        other => classify_transport(other),
    }
}

/// Errors of other SES operations (e.g. `GetAccount`): only transport matters there.
fn classify_any<E: ProvideErrorMetadata + std::fmt::Debug, R: std::fmt::Debug>(e: &SdkError<E, R>) -> MailError {
    match e {
        SdkError::ServiceError(s) => MailError::Transient(format!(
            "{}: {}",
            s.err().code().unwrap_or("unknown"),
            s.err().message().unwrap_or_default()
        )),
        other => classify_transport(other),
    }
}

fn classify_unmodelled(code: &str, message: &str, status: Option<u16>) -> MailError {
    let described = if message.starts_with(code) { message.to_owned() } else { format!("{code}: {message}") };
    match (code, status) {
        ("Throttling" | "ThrottlingException", _) | (_, Some(429)) if is_quota(message) => {
            MailError::AccountStopped(format!("the SES daily sending quota is spent ({described})"))
        }
        ("Throttling" | "ThrottlingException", _) | (_, Some(429)) => MailError::Throttled(described),
        // A 5xx can follow an accepted message (the front end timed out waiting, a proxy
        // failed on the way back): the message may have gone out.
        (_, Some(s)) if s >= 500 => MailError::Ambiguous(format!("SES answered {s}: {described}")),
        _ => MailError::Permanent(described),
    }
}

/// Transport failures: could the request have reached SES?
fn classify_transport<E: std::fmt::Debug, R: std::fmt::Debug>(e: &SdkError<E, R>) -> MailError {
    match e {
        SdkError::ConstructionFailure(_) => MailError::Permanent(format!("cannot build the request: {e:?}")),
        SdkError::DispatchFailure(d) if !d.is_timeout() && never_connected(e) => {
            MailError::Transient(format!("could not connect to SES: {d:?}"))
        }
        SdkError::DispatchFailure(d) => MailError::Ambiguous(format!("request failed in flight: {d:?}")),
        SdkError::TimeoutError(_) => MailError::Ambiguous("timed out waiting for SES".into()),
        SdkError::ResponseError(r) => MailError::Ambiguous(format!("unreadable SES response: {r:?}")),
        other => MailError::Ambiguous(format!("{other:?}")),
    }
}

/// Connection-establishment failures (refused, DNS, TLS handshake): nothing reached SES. The
/// socket's own error is checked by type; resolver and handshake errors are types private to
/// the HTTP client, so those are recognised by their text.
fn never_connected<E, R>(e: &SdkError<E, R>) -> bool {
    let SdkError::DispatchFailure(d) = e else { return false };
    let mut source = d.as_connector_error().map(|c| c as &(dyn std::error::Error + 'static));
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(io.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable)
        {
            return true;
        }
        source = e.source();
    }
    is_connect_error(&format!("{d:?}"))
}

/// The text of a connection-establishment failure.
fn is_connect_error(debug: &str) -> bool {
    let d = debug.to_ascii_lowercase();
    ["connection refused", "dns error", "failed to lookup", "connecterror", "connect error", "tcp connect"]
        .iter()
        .any(|s| d.contains(s))
}
