//! The AWS adapters against the real SDK clients with `aws-smithy-mocks`: every error class,
//! retries, the 202 check, the payload limit, typed parameters and decoding.

use aws_sdk_lambda::operation::get_function_concurrency::GetFunctionConcurrencyOutput;
use aws_sdk_lambda::operation::invoke::{InvokeError as LInvokeError, InvokeOutput};
use aws_sdk_lambda::operation::put_function_concurrency::PutFunctionConcurrencyOutput;
use aws_sdk_rdsdata::operation::begin_transaction::BeginTransactionOutput;
use aws_sdk_rdsdata::operation::commit_transaction::CommitTransactionOutput;
use aws_sdk_rdsdata::operation::execute_statement::{ExecuteStatementError, ExecuteStatementOutput};
use aws_sdk_rdsdata::operation::rollback_transaction::RollbackTransactionOutput;
use aws_sdk_rdsdata::types::{ColumnMetadata, Field, TypeHint};
use aws_sdk_secretsmanager::operation::get_secret_value::{GetSecretValueError, GetSecretValueOutput};
use aws_sdk_sesv2::operation::get_account::GetAccountOutput;
use aws_sdk_sesv2::operation::send_email::{SendEmailError, SendEmailOutput};
use aws_sdk_sesv2::types::SendQuota;
use aws_smithy_mocks::{RuleMode, mock, mock_client};
use baton::adapters::aws::data_api::{DataApiStore, DataApiTarget};
use baton::adapters::aws::invoke::LambdaInvoker;
use baton::adapters::aws::ses::{SesMailer, classify, sanitize_tag};
use baton::engine::event::Event;
use baton::ports::{InvokeError, Invoker, MailError, Mailer, OutgoingMail};
use baton::sql::{KeyType, Params, SqlStore, Stmt, Value};

fn mail() -> OutgoingMail {
    let raw = baton::mail::build(&baton::mail::Message {
        from: (Some("News"), "news@example.com"),
        to: "zoë@example.com",
        subject: "Hi",
        text: Some("hello"),
        html: None,
        unsubscribe_url: "https://example.com/u?r=x",
        message_id: "m1@example.com",
        date: 0,
    })
    .unwrap();
    OutgoingMail {
        from: "news@example.com".into(),
        to: "zoë@example.com".into(),
        message_id: "m1@example.com".into(),
        raw,
        tags: vec![("job".into(), "monthly newsletter!".into()), ("run".into(), "2026-12".into())],
    }
}

async fn send_with(rule: &aws_smithy_mocks::Rule) -> Result<(), MailError> {
    let client = mock_client!(aws_sdk_sesv2, [rule]);
    SesMailer::new(client, Some("newsletters".into())).send(&mail()).await
}

#[tokio::test]
async fn ses_sends_raw_content_with_unsubscribe_headers_tags_and_configuration_set() {
    let rule = mock!(aws_sdk_sesv2::Client::send_email)
        .match_requests(|req| {
            let raw =
                req.content().and_then(|c| c.raw()).map(|r| String::from_utf8_lossy(r.data().as_ref()).into_owned());
            let raw = raw.unwrap_or_default();
            let tags: Vec<(&str, &str)> = req.email_tags().iter().map(|t| (t.name(), t.value())).collect();
            raw.contains("List-Unsubscribe: <https://example.com/u?r=x>")
                && raw.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click")
                && req.configuration_set_name() == Some("newsletters")
                && req.destination().map(|d| d.to_addresses()) == Some(&["zoë@example.com".to_owned()][..])
                && tags == [("job", "monthly_newsletter_"), ("run", "2026-12")]
        })
        .then_output(|| SendEmailOutput::builder().message_id("ses-1").build());
    send_with(&rule).await.unwrap();
    assert_eq!(rule.num_calls(), 1);
    assert_eq!(sanitize_tag(""), "_");
}

#[tokio::test]
async fn ses_errors_are_classified_by_what_the_engine_must_do() {
    use aws_sdk_sesv2::types::error::*;
    type Case = (fn() -> SendEmailError, fn(&MailError) -> bool);
    let cases: Vec<Case> = vec![
        (
            || {
                SendEmailError::TooManyRequestsException(
                    TooManyRequestsException::builder().message("Maximum sending rate exceeded.").build(),
                )
            },
            |e| matches!(e, MailError::Throttled(_)),
        ),
        (
            || {
                SendEmailError::LimitExceededException(
                    LimitExceededException::builder().message("Daily message quota exceeded.").build(),
                )
            },
            |e| matches!(e, MailError::AccountStopped(m) if m.contains("daily sending quota")),
        ),
        (
            || SendEmailError::SendingPausedException(SendingPausedException::builder().message("paused").build()),
            |e| matches!(e, MailError::AccountStopped(m) if m.contains("baton resume")),
        ),
        (
            || SendEmailError::AccountSuspendedException(AccountSuspendedException::builder().message("no").build()),
            |e| matches!(e, MailError::AccountStopped(m) if m.contains("suspended")),
        ),
        (
            || {
                SendEmailError::MessageRejected(
                    MessageRejected::builder().message("Email address is not verified.").build(),
                )
            },
            |e| matches!(e, MailError::Permanent(m) if m.contains("not verified")),
        ),
        (
            || SendEmailError::BadRequestException(BadRequestException::builder().message("bad").build()),
            |e| matches!(e, MailError::Permanent(_)),
        ),
        (
            || {
                SendEmailError::MailFromDomainNotVerifiedException(
                    MailFromDomainNotVerifiedException::builder().message("x").build(),
                )
            },
            |e| matches!(e, MailError::Permanent(_)),
        ),
    ];
    for (error, expect) in cases {
        let rule = mock!(aws_sdk_sesv2::Client::send_email).then_error(error);
        let got = send_with(&rule).await.unwrap_err();
        assert!(expect(&got), "{:?} became {got:?}", error());
        assert_eq!(rule.num_calls(), 1, "SDK retries are off: SES has no idempotency token");
    }
}

#[tokio::test]
async fn ses_server_errors_and_timeouts_are_ambiguous() {
    // A 5xx can follow an accepted message: never "not sent". (Failed before the fix: 5xx were
    // `Transient` and retried, so at-most-once could mail twice.)
    for status in [500u16, 502, 503, 504] {
        let rule = mock!(aws_sdk_sesv2::Client::send_email).then_http_response(move || {
            aws_smithy_runtime_api::http::Response::new(
                aws_smithy_runtime_api::http::StatusCode::try_from(status).unwrap(),
                aws_smithy_types::body::SdkBody::from("{}"),
            )
        });
        let got = send_with(&rule).await.unwrap_err();
        assert!(matches!(got, MailError::Ambiguous(_)), "{status}: {got:?}");
    }
    let timeout = aws_sdk_sesv2::error::SdkError::timeout_error("operation timed out");
    assert!(matches!(classify(&timeout), MailError::Ambiguous(_)));
}

#[tokio::test]
async fn ses_max_send_rate_comes_from_get_account() {
    let rule = mock!(aws_sdk_sesv2::Client::get_account).then_output(|| {
        GetAccountOutput::builder()
            .sending_enabled(true)
            .send_quota(
                SendQuota::builder().max_send_rate(14.0).max24_hour_send(50_000.0).sent_last24_hours(0.0).build(),
            )
            .build()
    });
    let client = mock_client!(aws_sdk_sesv2, [&rule]);
    assert_eq!(SesMailer::new(client, None).max_send_rate().await.unwrap(), Some(14.0));
    let disabled = mock!(aws_sdk_sesv2::Client::get_account)
        .then_output(|| GetAccountOutput::builder().sending_enabled(false).build());
    let client = mock_client!(aws_sdk_sesv2, [&disabled]);
    assert!(matches!(SesMailer::new(client, None).max_send_rate().await, Err(MailError::AccountStopped(_))));
}

fn hop() -> Event {
    Event::Hop { run_id: "r1".into(), chain: 2, hop: 7, traceparent: None }
}

#[tokio::test]
async fn invoke_sends_an_event_invocation_and_requires_202() {
    let ok = mock!(aws_sdk_lambda::Client::invoke)
        .match_requests(|req| {
            req.invocation_type() == Some(&aws_sdk_lambda::types::InvocationType::Event)
                && req.function_name() == Some("baton")
                && req.payload().map(|p| Event::parse(p.as_ref()).ok() == Some(hop())).unwrap_or(false)
        })
        .then_output(|| InvokeOutput::builder().status_code(202).build());
    let client = mock_client!(aws_sdk_lambda, [&ok]);
    LambdaInvoker::new(client, "baton").invoke(&hop()).await.unwrap();
    assert_eq!(ok.num_calls(), 1);

    let not_accepted =
        mock!(aws_sdk_lambda::Client::invoke).then_output(|| InvokeOutput::builder().status_code(200).build());
    let client = mock_client!(aws_sdk_lambda, [&not_accepted]);
    let err = LambdaInvoker::new(client, "baton").invoke(&hop()).await.unwrap_err();
    assert!(matches!(&err, InvokeError::Retryable(m) if m.contains("202")), "{err:?}");
}

#[tokio::test]
async fn invoke_retries_throttling_and_names_the_fix_for_recursive_loops() {
    use aws_sdk_lambda::types::error::*;
    let throttled = mock!(aws_sdk_lambda::Client::invoke)
        .sequence()
        .error(|| {
            LInvokeError::TooManyRequestsException(TooManyRequestsException::builder().message("Rate exceeded").build())
        })
        .times(2)
        .output(|| InvokeOutput::builder().status_code(202).build())
        .build();
    let client = mock_client!(aws_sdk_lambda, RuleMode::Sequential, [&throttled]);
    LambdaInvoker::new(client, "baton").invoke(&hop()).await.unwrap();
    assert_eq!(throttled.num_calls(), 3);

    let recursive = mock!(aws_sdk_lambda::Client::invoke).then_error(|| {
        LInvokeError::RecursiveInvocationException(
            RecursiveInvocationException::builder().message("loop detected").build(),
        )
    });
    let client = mock_client!(aws_sdk_lambda, [&recursive]);
    let err = LambdaInvoker::new(client, "baton").invoke(&hop()).await.unwrap_err();
    assert!(matches!(&err, InvokeError::Fatal(m) if m.contains("RecursiveLoop: Allow")), "{err:?}");
    assert_eq!(recursive.num_calls(), 1);
}

/// Failed before: a missing function or a role without `lambda:InvokeFunction` was "retryable",
/// so every hop and sweeper restart failed the same way until the run's deadline. Now it is
/// fatal, with the fix named, and the engine pauses the run on it.
#[tokio::test]
async fn invoke_calls_a_wrong_function_or_permission_fatal_and_names_the_fix() {
    use aws_sdk_lambda::error::ErrorMetadata;
    use aws_sdk_lambda::types::error::*;
    let missing = mock!(aws_sdk_lambda::Client::invoke).then_error(|| {
        LInvokeError::ResourceNotFoundException(
            ResourceNotFoundException::builder().message("Function not found: baton").build(),
        )
    });
    let denied = mock!(aws_sdk_lambda::Client::invoke).then_error(|| {
        LInvokeError::generic(ErrorMetadata::builder().code("AccessDeniedException").message("not authorized").build())
    });
    for (rule, fix) in [(&missing, "lambda:InvokeFunction"), (&denied, "lambda:InvokeFunction")] {
        let client = mock_client!(aws_sdk_lambda, [rule]);
        let err = LambdaInvoker::new(client, "baton").invoke(&hop()).await.unwrap_err();
        assert!(matches!(&err, InvokeError::Fatal(m) if m.contains(fix)), "{err:?}");
        assert_eq!(rule.num_calls(), 1, "not retried");
    }
}

#[tokio::test]
async fn invoke_refuses_payloads_over_one_megabyte_without_calling() {
    let rule = mock!(aws_sdk_lambda::Client::invoke).then_output(|| InvokeOutput::builder().status_code(202).build());
    let client = mock_client!(aws_sdk_lambda, [&rule]);
    let huge = Event::Start { job: "x".repeat(1024 * 1024 + 1), run_key: None, scheduled_time: None };
    let err = LambdaInvoker::new(client, "baton").invoke(&huge).await.unwrap_err();
    assert!(matches!(&err, InvokeError::Fatal(m) if m.contains("1 MB")), "{err:?}");
    assert_eq!(rule.num_calls(), 0);
}

#[tokio::test]
async fn brake_sets_reserved_concurrency_to_zero_and_release_restores_it() {
    let get = mock!(aws_sdk_lambda::Client::get_function_concurrency)
        .then_output(|| GetFunctionConcurrencyOutput::builder().reserved_concurrent_executions(8).build());
    let put_zero = mock!(aws_sdk_lambda::Client::put_function_concurrency)
        .match_requests(|r| r.reserved_concurrent_executions() == Some(0))
        .then_output(|| PutFunctionConcurrencyOutput::builder().reserved_concurrent_executions(0).build());
    let put_back = mock!(aws_sdk_lambda::Client::put_function_concurrency)
        .match_requests(|r| r.reserved_concurrent_executions() == Some(8))
        .then_output(|| PutFunctionConcurrencyOutput::builder().reserved_concurrent_executions(8).build());
    let client = mock_client!(aws_sdk_lambda, RuleMode::MatchAny, [&get, &put_zero, &put_back]);
    let invoker = LambdaInvoker::new(client, "baton");
    let before = invoker.brake().await.unwrap();
    assert_eq!(before, Some(8));
    invoker.release(before).await.unwrap();
    assert_eq!((get.num_calls(), put_zero.num_calls(), put_back.num_calls()), (1, 1, 1));
}

fn target() -> DataApiTarget {
    DataApiTarget {
        resource_arn: "arn:aws:rds:eu-west-1:123456789012:cluster:baton".into(),
        secret_arn: "arn:aws:secretsmanager:eu-west-1:123456789012:secret:baton".into(),
        database: "baton".into(),
    }
}

#[tokio::test]
async fn data_api_binds_typed_parameters_and_decodes_fields() {
    let rule = mock!(aws_sdk_rdsdata::Client::execute_statement)
        .match_requests(|req| {
            let p = req.parameters();
            let find = |n: &str| p.iter().find(|x| x.name() == Some(n)).cloned();
            req.sql() == Some("SELECT * FROM t WHERE (CAST(:lo AS BIGINT) IS NULL OR id > CAST(:lo AS BIGINT)) AND u = :u AND n = :n")
                && req.include_result_metadata() == Some(true)
                && req.database() == Some("baton")
                && find("lo").and_then(|x| x.value().cloned()) == Some(Field::IsNull(true))
                && find("u").map(|x| (x.value().cloned(), x.type_hint().cloned()))
                    == Some((Some(Field::StringValue("6f1c0b9e-0000-4000-8000-000000000001".into())), Some(TypeHint::Uuid)))
                && find("n").and_then(|x| x.value().cloned()) == Some(Field::LongValue(42))
        })
        .then_output(|| {
            ExecuteStatementOutput::builder()
                .column_metadata(ColumnMetadata::builder().name("id").build())
                .column_metadata(ColumnMetadata::builder().name("name").build())
                .records(vec![Field::LongValue(7), Field::StringValue("Zoë".into())])
                .records(vec![Field::LongValue(8), Field::IsNull(true)])
                .build()
        });
    let client = mock_client!(aws_sdk_rdsdata, [&rule]);
    let store = DataApiStore::new(client, target());
    let rows = store
        .query(Stmt::new(
            "SELECT * FROM t WHERE (:lo IS NULL OR id > :lo) AND u = :u AND n = :n",
            Params::new()
                .with("lo", Value::NullOf(KeyType::Int))
                .with("u", Value::Uuid("6f1c0b9e-0000-4000-8000-000000000001".into()))
                .with("n", 42i64),
        ))
        .await
        .unwrap();
    assert_eq!(rule.num_calls(), 1, "the request did not match");
    assert_eq!(rows.columns, vec!["id", "name"]);
    assert_eq!(rows.rows, vec![vec![Value::Int(7), Value::Text("Zoë".into())], vec![Value::Int(8), Value::Null]]);
}

#[tokio::test]
async fn data_api_retries_a_resuming_database_and_statement_timeouts() {
    use aws_sdk_rdsdata::types::error::*;
    let rule = mock!(aws_sdk_rdsdata::Client::execute_statement)
        .sequence()
        .error(|| {
            ExecuteStatementError::DatabaseResumingException(
                DatabaseResumingException::builder().message("resuming").build(),
            )
        })
        .times(2)
        .error(|| {
            ExecuteStatementError::StatementTimeoutException(
                StatementTimeoutException::builder().message("timeout").build(),
            )
        })
        .output(|| ExecuteStatementOutput::builder().number_of_records_updated(3).build())
        .build();
    let client = mock_client!(aws_sdk_rdsdata, RuleMode::Sequential, [&rule]);
    let rows = DataApiStore::new(client, target()).query(Stmt::new("UPDATE t SET x = 1", Params::new())).await.unwrap();
    assert_eq!((rule.num_calls(), rows.affected), (4, 3));
}

#[tokio::test]
async fn data_api_gives_up_on_a_database_that_never_resumes_and_explains_size_limits() {
    use aws_sdk_rdsdata::types::error::*;
    let resuming = mock!(aws_sdk_rdsdata::Client::execute_statement).then_error(|| {
        ExecuteStatementError::DatabaseResumingException(
            DatabaseResumingException::builder().message("resuming").build(),
        )
    });
    let client = mock_client!(aws_sdk_rdsdata, RuleMode::MatchAny, [&resuming]);
    let store = DataApiStore::new(client, target()).with_resume_budget(std::time::Duration::from_millis(300));
    let err = store.query(Stmt::new("SELECT 1", Params::new())).await.unwrap_err();
    assert!(err.is_transient() && err.to_string().contains("resuming"), "{err}");
    assert!(resuming.num_calls() >= 2);

    let too_big = mock!(aws_sdk_rdsdata::Client::execute_statement).then_error(|| {
        ExecuteStatementError::BadRequestException(
            BadRequestException::builder()
                .message("Database returned more than the allowed response size limit")
                .build(),
        )
    });
    let client = mock_client!(aws_sdk_rdsdata, [&too_big]);
    let err = DataApiStore::new(client, target()).query(Stmt::new("SELECT 1", Params::new())).await.unwrap_err();
    assert!(!err.is_transient() && err.to_string().contains("page_size"), "{err}");
}

#[tokio::test]
async fn data_api_transactions_commit_or_roll_back() {
    use aws_sdk_rdsdata::types::error::*;
    let begin = mock!(aws_sdk_rdsdata::Client::begin_transaction)
        .then_output(|| BeginTransactionOutput::builder().transaction_id("tx-1").build());
    let exec = mock!(aws_sdk_rdsdata::Client::execute_statement)
        .match_requests(|r| r.transaction_id() == Some("tx-1"))
        .then_output(|| ExecuteStatementOutput::builder().number_of_records_updated(1).build());
    let commit = mock!(aws_sdk_rdsdata::Client::commit_transaction)
        .match_requests(|r| r.transaction_id() == Some("tx-1"))
        .then_output(|| CommitTransactionOutput::builder().transaction_status("Transaction Committed").build());
    let client = mock_client!(aws_sdk_rdsdata, RuleMode::MatchAny, [&begin, &exec, &commit]);
    let stmts = vec![Stmt::new("UPDATE a SET x = 1", Params::new()), Stmt::new("UPDATE b SET y = 2", Params::new())];
    let out = DataApiStore::new(client, target()).transaction(stmts.clone()).await.unwrap();
    assert_eq!((out.len(), exec.num_calls(), commit.num_calls()), (2, 2, 1));

    let failing = mock!(aws_sdk_rdsdata::Client::execute_statement).then_error(|| {
        ExecuteStatementError::BadRequestException(BadRequestException::builder().message("duplicate key").build())
    });
    let rollback = mock!(aws_sdk_rdsdata::Client::rollback_transaction)
        .then_output(|| RollbackTransactionOutput::builder().transaction_status("Rollback Complete").build());
    let client = mock_client!(aws_sdk_rdsdata, RuleMode::MatchAny, [&begin, &failing, &rollback]);
    let err = DataApiStore::new(client, target()).transaction(stmts).await.unwrap_err();
    assert!(err.to_string().contains("duplicate key"));
    assert_eq!(rollback.num_calls(), 1);
}

#[tokio::test]
async fn the_unsubscribe_key_comes_from_secrets_manager_and_a_refusal_names_the_fix() {
    use baton::adapters::aws::secrets::{SecretError, secret_string};
    use secrecy::ExposeSecret;
    let arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:unsubscribe-AbC";
    let found = mock!(aws_sdk_secretsmanager::Client::get_secret_value)
        .match_requests(move |r| r.secret_id() == Some(arn))
        .then_output(|| GetSecretValueOutput::builder().secret_string("k".repeat(64)).build());
    let client = mock_client!(aws_sdk_secretsmanager, [&found]);
    assert_eq!(secret_string(&client, arn).await.unwrap().expose_secret(), "k".repeat(64));

    // A value that is not the key alone is refused, never used as part of it.
    for (value, says) in [
        (None, "binary secret"),
        (Some(format!("{}\n", "k".repeat(64))), "whitespace around the key"),
        (Some(r#"{"key": "0123456789abcdef0123"}"#.to_owned()), "JSON key/value pairs"),
    ] {
        let rule = mock!(aws_sdk_secretsmanager::Client::get_secret_value).then_output(move || match &value {
            Some(v) => GetSecretValueOutput::builder().secret_string(v).build(),
            None => GetSecretValueOutput::builder().secret_binary(aws_smithy_types::Blob::new("k")).build(),
        });
        let client = mock_client!(aws_sdk_secretsmanager, [&rule]);
        let err = secret_string(&client, arn).await.unwrap_err();
        assert!(matches!(err, SecretError::Unusable { .. }) && err.to_string().contains(says), "{err}");
    }
    let missing = mock!(aws_sdk_secretsmanager::Client::get_secret_value).then_error(|| {
        GetSecretValueError::ResourceNotFoundException(
            aws_sdk_secretsmanager::types::error::ResourceNotFoundException::builder().message("no").build(),
        )
    });
    let client = mock_client!(aws_sdk_secretsmanager, [&missing]);
    assert!(secret_string(&client, arn).await.unwrap_err().to_string().contains("check the ARN"));

    let denied = mock!(aws_sdk_secretsmanager::Client::get_secret_value).then_error(|| {
        GetSecretValueError::generic(
            aws_smithy_types::error::ErrorMetadata::builder()
                .code("AccessDeniedException")
                .message("not authorized to perform secretsmanager:GetSecretValue")
                .build(),
        )
    });
    let client = mock_client!(aws_sdk_secretsmanager, [&denied]);
    let message = secret_string(&client, arn).await.unwrap_err().to_string();
    for says in ["BATON_UNSUBSCRIBE_SECRET_ARN", arn, "AccessDeniedException", "secretsmanager:GetSecretValue on it"] {
        assert!(message.contains(says), "{message} lacks {says}");
    }
}
