//! Secrets Manager: the unsubscribe HMAC key, read once per Lambda sandbox from the secret
//! `BATON_UNSUBSCRIBE_SECRET_ARN` names (the deploy template creates it with a generated
//! value). The key never goes into an environment variable, a log line or a run's snapshot.
//!
//! The value is the key itself, used byte for byte: a value with surrounding whitespace (a
//! trailing newline from `--secret-string file://key`) or a JSON object (the console's
//! key/value form) is refused rather than silently becoming part of the key.

use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError;
use secrecy::SecretString;

/// The variable naming the secret whose `SecretString` is the unsubscribe key.
pub const UNSUBSCRIBE_SECRET_ARN_VAR: &str = "BATON_UNSUBSCRIBE_SECRET_ARN";

/// Why the secret could not be read or used; each names the secret and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "{UNSUBSCRIBE_SECRET_ARN_VAR}: secret {id} does not exist (or is deleted or scheduled for deletion): check the ARN"
    )]
    NotFound { id: String },
    #[error(
        "{UNSUBSCRIBE_SECRET_ARN_VAR}: not allowed to read secret {id}: {code}: {message} (the function's role needs \
         secretsmanager:GetSecretValue on it, and kms:Decrypt if it uses a customer-managed key)"
    )]
    Refused { id: String, code: String, message: String },
    /// Throttling, a service fault, the network: the next cold start may succeed.
    #[error("{UNSUBSCRIBE_SECRET_ARN_VAR}: cannot read secret {id} now: {detail}")]
    Unavailable { id: String, detail: String },
    #[error("{UNSUBSCRIBE_SECRET_ARN_VAR}: secret {id} {why}")]
    Unusable { id: String, why: &'static str },
}

/// The secret's current `SecretString`, checked to be a key and nothing else.
pub async fn secret_string(client: &Client, id: &str) -> Result<SecretString, SecretError> {
    let output = client.get_secret_value().secret_id(id).send().await.map_err(|e| classify(id, &e))?;
    let unusable = |why| SecretError::Unusable { id: id.to_owned(), why };
    let value = output.secret_string.ok_or(unusable("has no SecretString (a binary secret): store the key as text"))?;
    if value.trim() != value {
        return Err(unusable(
            "has whitespace around the key (a trailing newline?): it would be part of the HMAC key; store the key alone",
        ));
    }
    if serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&value).is_ok() {
        return Err(unusable(
            "holds JSON key/value pairs: store the key alone, as plaintext (e.g. `openssl rand -hex 32`)",
        ));
    }
    Ok(SecretString::from(value))
}

fn classify(id: &str, e: &SdkError<GetSecretValueError>) -> SecretError {
    let id = id.to_owned();
    let Some(service) = e.as_service_error() else {
        return SecretError::Unavailable { id, detail: DisplayErrorContext(e).to_string() };
    };
    match service {
        GetSecretValueError::ResourceNotFoundException(_) => SecretError::NotFound { id },
        GetSecretValueError::InternalServiceError(_) => {
            SecretError::Unavailable { id, detail: DisplayErrorContext(e).to_string() }
        }
        other if other.code() == Some("ThrottlingException") => {
            SecretError::Unavailable { id, detail: DisplayErrorContext(e).to_string() }
        }
        // AccessDenied, DecryptionFailure, InvalidRequest (a deleted secret), ...
        other => SecretError::Refused {
            id,
            code: other.code().unwrap_or("unknown").to_owned(),
            message: other.message().unwrap_or_default().to_owned(),
        },
    }
}
