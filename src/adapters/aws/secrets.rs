//! Secrets Manager: the unsubscribe HMAC key, read once per Lambda sandbox from the secret
//! `BATON_UNSUBSCRIBE_SECRET_ARN` names (the deploy template creates it with a generated
//! value). The key never goes into an environment variable, a log line or a run's snapshot.

use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::error::{DisplayErrorContext, ProvideErrorMetadata};
use secrecy::SecretString;

/// The variable naming the secret whose `SecretString` is the unsubscribe key.
pub const UNSUBSCRIBE_SECRET_ARN_VAR: &str = "BATON_UNSUBSCRIBE_SECRET_ARN";

/// Why the secret could not be read; each names the secret and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "{UNSUBSCRIBE_SECRET_ARN_VAR}: cannot read secret {id}: {code}: {message} (the function's role needs \
         secretsmanager:GetSecretValue on it, and kms:Decrypt if it uses a customer-managed key)"
    )]
    Refused { id: String, code: String, message: String },
    #[error("{UNSUBSCRIBE_SECRET_ARN_VAR}: cannot read secret {id}: {detail}")]
    Unavailable { id: String, detail: String },
    #[error("{UNSUBSCRIBE_SECRET_ARN_VAR}: secret {id} has no SecretString (a binary secret): store the key as text")]
    NotText { id: String },
}

/// The secret's current `SecretString`.
pub async fn secret_string(client: &Client, id: &str) -> Result<SecretString, SecretError> {
    let output = client.get_secret_value().secret_id(id).send().await.map_err(|e| {
        let id = id.to_owned();
        match e.code() {
            Some(code) => {
                SecretError::Refused { id, code: code.to_owned(), message: e.message().unwrap_or_default().to_owned() }
            }
            None => SecretError::Unavailable { id, detail: DisplayErrorContext(&e).to_string() },
        }
    })?;
    output.secret_string.map(SecretString::from).ok_or_else(|| SecretError::NotText { id: id.to_owned() })
}
