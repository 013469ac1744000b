//! The next-hop port on Lambda: `Invoke` with `InvocationType::Event` on the function itself.
//!
//! - Lambda answers an accepted asynchronous invocation with 202; anything else is an error.
//! - Payloads over 1 MB are refused before sending (Lambda's async limit); a hop event is a few
//!   hundred bytes, so this only guards against bugs.
//! - Throttling is retried with jittered backoff; a duplicate from a retry is harmless (hops are
//!   fork-proof), a lost event is the sweeper's job.
//! - `RecursiveInvocationException` (Lambda's recursive-loop detection stops chains after about
//!   16 hops) is fatal, and the message names the fix: `RecursiveLoop: Allow`.
//! - Invoke requests carry no `X-Amzn-Trace-Id`. `lambda_runtime` sets `_X_AMZN_TRACE_ID` for
//!   every invocation and the SDK's recursion-detection interceptor copies it into every request;
//!   on `Invoke` that header is what Lambda's recursive-loop detection counts, silently dropping
//!   about the 17th hop of a chain (async `Invoke` still answers 202). [`LambdaInvoker::client_from`]
//!   adds an interceptor that removes it just before sending (the header is not signed). Each hop
//!   is its own trace, linked to the previous one through the event's `traceparent`.
//!
//! The operator's emergency brake lives here too: reserved concurrency 0, and its release.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_lambda::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_lambda::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_lambda::error::{BoxError, ProvideErrorMetadata, SdkError};
use aws_sdk_lambda::operation::invoke::InvokeError as SdkInvokeError;
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::InvocationType;

use crate::engine::event::Event;
use crate::jobs::backoff;
use crate::ports::{InvokeError, Invoker};

pub struct LambdaInvoker {
    client: aws_sdk_lambda::Client,
    function: String,
    attempts: u32,
}

/// Removes `X-Amzn-Trace-Id` from every request (see the module docs).
#[derive(Debug)]
struct NoTraceHeader;

impl Intercept for NoTraceHeader {
    fn name(&self) -> &'static str {
        "baton::NoTraceHeader"
    }

    fn modify_before_transmit(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        context.request_mut().headers_mut().remove("x-amzn-trace-id");
        Ok(())
    }
}

impl LambdaInvoker {
    /// A Lambda client from the shared AWS config whose requests carry no `X-Amzn-Trace-Id`, so
    /// chains are not counted as recursive loops by Lambda (see the module docs).
    pub fn client_from(shared: &aws_config::SdkConfig) -> aws_sdk_lambda::Client {
        let config = aws_sdk_lambda::config::Builder::from(shared).interceptor(NoTraceHeader).build();
        aws_sdk_lambda::Client::from_conf(config)
    }

    /// `function`: the name or ARN to invoke (in Lambda, `AWS_LAMBDA_FUNCTION_NAME`).
    pub fn new(client: aws_sdk_lambda::Client, function: impl Into<String>) -> Self {
        Self { client, function: function.into(), attempts: 5 }
    }

    /// The emergency brake: reserved concurrency 0 stops every invocation of the function,
    /// queued hops included, without a deploy. Returns the previous reserved concurrency.
    pub async fn brake(&self) -> Result<Option<i32>, InvokeError> {
        let before = self
            .client
            .get_function_concurrency()
            .function_name(&self.function)
            .send()
            .await
            .map_err(|e| describe(&e, "GetFunctionConcurrency"))?
            .reserved_concurrent_executions();
        self.client
            .put_function_concurrency()
            .function_name(&self.function)
            .reserved_concurrent_executions(0)
            .send()
            .await
            .map_err(|e| describe(&e, "PutFunctionConcurrency"))?;
        Ok(before)
    }

    /// Releases the brake: back to `reserved` concurrency, or to none reserved.
    pub async fn release(&self, reserved: Option<i32>) -> Result<(), InvokeError> {
        match reserved {
            Some(n) => self
                .client
                .put_function_concurrency()
                .function_name(&self.function)
                .reserved_concurrent_executions(n)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| describe(&e, "PutFunctionConcurrency")),
            None => self
                .client
                .delete_function_concurrency()
                .function_name(&self.function)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| describe(&e, "DeleteFunctionConcurrency")),
        }
    }
}

fn describe<E: std::error::Error + std::fmt::Debug, R: std::fmt::Debug>(e: &SdkError<E, R>, op: &str) -> InvokeError {
    let message = match e {
        SdkError::ServiceError(s) => format!("{op} failed: {}", s.err()),
        other => format!("{op} failed: {other:?}"),
    };
    // The brake's calls: the operator sees the failure and runs the command again (setting the
    // same concurrency twice is harmless).
    InvokeError::Retryable(message)
}

/// What to do about one failed `Invoke`.
#[derive(Debug)]
enum Next {
    /// Try again; `ambiguous` when the request may have queued the event.
    Retry {
        why: String,
        ambiguous: bool,
    },
    Fail(InvokeError),
}

fn classify<R: std::fmt::Debug>(e: &SdkError<SdkInvokeError, R>) -> Next {
    match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            let described = err.to_string();
            match err {
                SdkInvokeError::RecursiveInvocationException(_) => Next::Fail(InvokeError::Fatal(format!(
                    "Lambda stopped the chain as a recursive loop ({described}). Set `RecursiveLoop: Allow` on \
                         the function (deploy/template.yaml does); baton's own hop budget bounds every chain"
                ))),
                SdkInvokeError::TooManyRequestsException(_)
                | SdkInvokeError::ServiceException(_)
                | SdkInvokeError::ResourceNotReadyException(_)
                | SdkInvokeError::ResourceConflictException(_) => Next::Retry { why: described, ambiguous: false },
                SdkInvokeError::RequestTooLargeException(_) => Next::Fail(InvokeError::Fatal(described)),
                // The function, its permission or the request is wrong: no retry will help, and
                // the run fails at once with the reason instead of every hop and restart
                // failing until the run's deadline.
                SdkInvokeError::ResourceNotFoundException(_)
                | SdkInvokeError::InvalidParameterValueException(_)
                | SdkInvokeError::InvalidRequestContentException(_)
                | SdkInvokeError::UnsupportedMediaTypeException(_) => Next::Fail(InvokeError::Fatal(format!(
                    "{described} (check the function name and the role's lambda:InvokeFunction permission on itself)"
                ))),
                other if matches!(other.code(), Some("AccessDeniedException" | "AccessDenied")) => {
                    Next::Fail(InvokeError::Fatal(format!(
                        "{described}: the function's role may not invoke it; allow lambda:InvokeFunction on the \
                         function's own ARN"
                    )))
                }
                // Not retried here; the sweeper tries the chain again later.
                _ => Next::Fail(InvokeError::Retryable(described)),
            }
        }
        // An event invoked twice is harmless (fork-proof hops): retry transport failures too.
        // The SDK's own words for a dispatch failure: the request may have been sent.
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            Next::Retry { why: format!("{e:?}"), ambiguous: true }
        }
        other => Next::Fail(InvokeError::Retryable(format!("{other:?}"))),
    }
}

#[async_trait]
impl Invoker for LambdaInvoker {
    async fn invoke(&self, event: &Event) -> Result<(), InvokeError> {
        let payload = event.to_payload().map_err(|e| InvokeError::Fatal(e.to_string()))?;
        let (mut last, mut ambiguous) = (String::new(), false);
        for attempt in 1..=self.attempts {
            let sent = self
                .client
                .invoke()
                .function_name(&self.function)
                .invocation_type(InvocationType::Event)
                .payload(Blob::new(payload.as_bytes()))
                .send()
                .await;
            match sent {
                Ok(out) if out.status_code() == 202 => return Ok(()),
                Ok(out) => {
                    return Err(InvokeError::Retryable(format!(
                        "Invoke answered {} instead of 202 Accepted{}",
                        out.status_code(),
                        out.function_error().map(|f| format!(" ({f})")).unwrap_or_default()
                    )));
                }
                Err(e) => match classify(&e) {
                    Next::Fail(err) => return Err(err),
                    Next::Retry { why, ambiguous: maybe } => {
                        last = why;
                        // Once any attempt may have queued the event, the outcome stays unknown.
                        ambiguous |= maybe;
                    }
                },
            }
            if attempt < self.attempts {
                tokio::time::sleep(backoff(attempt, Duration::from_millis(100), Duration::from_secs(3))).await;
            }
        }
        let why = format!("Invoke kept failing after {} attempts: {last}", self.attempts);
        Err(if ambiguous { InvokeError::Ambiguous(why) } else { InvokeError::Retryable(why) })
    }
}
