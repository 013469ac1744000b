//! A whole newsletter run entirely through the AWS adapters and their real SDK clients, on
//! loopback: Lambda `Invoke` (with duplicate deliveries), the RDS Data API (an emulator over
//! the test PostgreSQL server, with an injected `DatabaseResumingException`) and SES v2 (moto).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use baton::adapters::aws::data_api::{DataApiStore, DataApiTarget};
use baton::adapters::aws::invoke::LambdaInvoker;
use baton::adapters::aws::ses::SesMailer;
use baton::adapters::postgres::PostgresStore;
use baton::config::Config;
use baton::engine::{Engine, Outcome};
use baton::sql::{Params, SqlStore, Stmt};

use crate::fakes::{FakeDataApi, FakeLambda, sdk_config, serve_data_api, serve_lambda};
use crate::support::{JOB, duplicates, fake_aws_env, int_users, newsletter_job, pg_with_users, test_settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newsletter_of_2000_users_runs_entirely_through_the_aws_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let users = int_users(2000);
    let (_store, name, url) = pg_with_users(dir.path(), &users).await;
    let pg = PostgresStore::connect(&url, 16).unwrap();

    // Every 29th statement commits and then answers 503: the engine must re-run it safely, and
    // the SDK must not re-send it on its own.
    let data_api = Arc::new(FakeDataApi { lost_every: 29, ..FakeDataApi::new(pg) });
    data_api.resuming_next.store(3, Ordering::SeqCst); // the cluster is waking up
    let data_api_url = serve_data_api(data_api.clone()).await;
    let lambda = Arc::new(FakeLambda { duplicate_every: 3, timeout: Duration::from_secs(2), ..Default::default() });
    let lambda_url = serve_lambda(lambda.clone()).await;
    let moto = crate::moto::moto_url();
    crate::moto::verify_sender(&moto, "aurora@example.com").await;

    let target = DataApiTarget {
        resource_arn: "arn:aws:rds:eu-west-1:123456789012:cluster:baton".into(),
        secret_arn: "arn:aws:secretsmanager:eu-west-1:123456789012:secret:baton".into(),
        database: name,
    };
    let data_api_store = Arc::new(DataApiStore::new(DataApiStore::client_from(&sdk_config(&data_api_url)), target));
    let mut settings = test_settings();
    settings.hop_timeout = Duration::from_secs(5);
    settings.hop_margin = Duration::from_secs(2);
    settings.max_pages_per_hop = Some(3);
    let mut job = newsletter_job(50, 4);
    job.newsletter.as_mut().unwrap().from = "Aurora News <aurora@example.com>".into();
    let mailer = Arc::new(SesMailer::new(SesMailer::client_from(&sdk_config(&moto)), None));
    let config = Config { settings, jobs: [(JOB.to_owned(), job)].into() };
    let invoker = Arc::new(LambdaInvoker::new(aws_sdk_lambda::Client::new(&sdk_config(&lambda_url)), "baton"));
    let adapters = baton::compose::Adapters::new(data_api_store.clone(), mailer, config);
    let engine = Arc::new(Engine::new(adapters.engine_parts(invoker)));
    assert!(lambda.engine.set(engine.clone()).is_ok());

    let Outcome::Started { run_id, items, .. } = engine.start(JOB, Some("2026-12")).await.unwrap() else { panic!() };
    assert_eq!(items, 2000);
    assert_eq!(data_api.resuming_next.load(Ordering::SeqCst), 0, "the resuming database was waited out");
    let until = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let p = engine.progress(&run_id).await.unwrap();
        if p.is_settled() {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "run did not finish: {p:?}");
        engine.sweep().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = engine.status(Some(&run_id)).await.unwrap().unwrap();
    assert_eq!(status.status, "succeeded", "{status:?}");
    assert!(lambda.duplicated.load(Ordering::SeqCst) >= 4, "duplicate hop deliveries happened");
    let sent = crate::moto::moto_sent_from(&moto, "aurora@example.com").await;
    assert!(duplicates(&sent).is_empty(), "{:?}", duplicates(&sent));
    let valid: Vec<&String> =
        users.iter().filter_map(|(_, e, _)| e.as_ref()).filter(|e| baton::mail::check_address(e).is_ok()).collect();
    assert_eq!(sent.len(), valid.len(), "every valid user has exactly one message in moto");
    assert_eq!(status.skipped, 80);
    assert!(data_api.lost.load(Ordering::SeqCst) > 10, "responses were lost after commit");
    assert_eq!(status.claimed, 0, "no item is left claimed: {status:?}");
    // Sends still in flight at a hop's cut-off are `unknown` (delivered at most once).
    assert!(status.done as usize <= sent.len() && sent.len() <= (status.done + status.unknown) as usize, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_api_emulator_runs_every_engine_statement_and_enforces_the_response_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, name, url) = pg_with_users(dir.path(), &int_users(3000)).await;
    let pg = PostgresStore::connect(&url, 4).unwrap();
    let mut api = FakeDataApi::new(pg);
    api.response_limit = 64 * 1024;
    let api = Arc::new(api);
    api.timeout_next.store(1, Ordering::SeqCst);
    let url = serve_data_api(api.clone()).await;
    let target = DataApiTarget { resource_arn: "arn:r".into(), secret_arn: "arn:s".into(), database: name };
    let data_api = DataApiStore::new(aws_sdk_rdsdata::Client::new(&sdk_config(&url)), target);
    let small =
        data_api.query(Stmt::new("SELECT id, name FROM users ORDER BY id LIMIT 2", Params::new())).await.unwrap();
    assert_eq!(small.rows.len(), 2, "retried past the statement timeout");
    assert_eq!(small.columns, vec!["id", "name"]);
    let err = data_api.query(Stmt::new("SELECT * FROM users", Params::new())).await.unwrap_err();
    assert!(err.to_string().contains("page_size"), "{err}");
}

/// The operator's CLI against a run that lives in Aurora: the binary with `--store data-api`
/// (through the emulator) and `--invoker lambda` (through the Invoke fake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_cli_starts_inspects_pauses_and_cancels_runs_in_aurora() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, name, url) = pg_with_users(dir.path(), &int_users(100)).await;
    let pg = PostgresStore::connect(&url, 4).unwrap();
    let data_api_url = serve_data_api(Arc::new(FakeDataApi::new(pg))).await;
    let lambda = Arc::new(FakeLambda::default());
    let lambda_url = serve_lambda(lambda.clone()).await;
    let config = dir.path().join("baton.toml");
    std::fs::write(
        &config,
        "[jobs.news]\nkind = 'newsletter'\nsource = 'SELECT id, email, name FROM users'\npage_size = 10\nchains = 3\n\
         [jobs.news.newsletter]\nfrom = 'news@example.com'\nsubject = 'Hi'\ntext = 'Hello'\n\
         unsubscribe_url = 'https://example.com/u'\nunsubscribe_secret = '0123456789abcdef-operator'\n",
    )
    .unwrap();
    let baton = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(
            [
                "--store",
                "data-api",
                "--db-cluster-arn",
                "arn:aws:rds:eu-west-1:1:cluster:c",
                "--db-secret-arn",
                "arn:aws:secretsmanager:eu-west-1:1:secret:s",
                "--db-name",
                &name,
                "--invoker",
                "lambda",
                "--function",
                "baton",
                "--config",
                config.to_str().unwrap(),
            ]
            .map(String::from),
        );
        let (data_api_url, lambda_url) = (data_api_url.clone(), lambda_url.clone());
        tokio::task::spawn_blocking(move || {
            fake_aws_env(&mut std::process::Command::new(env!("CARGO_BIN_EXE_baton")))
                .args(&all)
                .env("AWS_ENDPOINT_URL_RDS_DATA", data_api_url)
                .env("AWS_ENDPOINT_URL_LAMBDA", lambda_url)
                .output()
                .unwrap()
        })
    };
    let out = baton(&["start", "news", "--run-key", "2026-12", "--json"]).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let started: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((started["items"].as_i64(), started["chains"].as_i64()), (Some(100), Some(3)));
    assert_eq!(lambda.accepted.load(Ordering::SeqCst), 3, "hop 1 of each chain went to Lambda");

    let out = baton(&["status", "--json"]).await.unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((status["status"].as_str(), status["total"].as_i64()), (Some("running"), Some(100)));

    let out = baton(&["pause"]).await.unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("is now pausing"), "{out:?}");
    let out = baton(&["cancel", "--json"]).await.unwrap();
    let cancelled: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cancelled["status"], "cancelled");
}

/// The SDK's own retries would re-send a statement whose response was lost after it committed:
/// the production client sends it once and reports a transient error for the engine to judge.
/// (Failed before the fix: `aws_sdk_rdsdata::Client::new` kept the standard retries, and the
/// insert below ran three times.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_api_client_never_resends_a_statement_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let (store, name, url) = pg_with_users(dir.path(), &[]).await;
    store.query(Stmt::new("CREATE TABLE hits (n BIGINT)", Params::new())).await.unwrap();
    let pg = PostgresStore::connect(&url, 2).unwrap();
    let data_api = Arc::new(FakeDataApi { lost_every: 1, ..FakeDataApi::new(pg) });
    let endpoint = serve_data_api(data_api.clone()).await;
    let target = DataApiTarget { resource_arn: "arn:c".into(), secret_arn: "arn:s".into(), database: name };
    let data_api_store = DataApiStore::new(DataApiStore::client_from(&sdk_config(&endpoint)), target);
    let err = data_api_store.query(Stmt::new("INSERT INTO hits (n) VALUES (1)", Params::new())).await.unwrap_err();
    assert!(err.is_transient(), "a lost response is transient, for the engine to re-run: {err}");
    assert_eq!(data_api.executes.load(Ordering::SeqCst), 1, "sent exactly once");
    let hits = store.query(Stmt::new("SELECT COUNT(*) AS n FROM hits", Params::new())).await.unwrap();
    assert_eq!(hits.first().unwrap().int("n").unwrap(), 1);
}

/// bigint, text, uuid and timestamp keys through the Data API emulator, which types parameters
/// and results as the Data API does. Before the fix, a uuid key came back as a plain string,
/// was bound back as `varchar`, and the first page failed with "operator does not exist: uuid >
/// character varying" (as on Aurora); timestamp keys could not be read at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_every_type_page_through_the_data_api() {
    use crate::support::{Harness, Rig, Setup};
    type KeyLiteral = fn(usize) -> String;
    let kinds: [(&str, KeyLiteral); 4] = [
        ("BIGINT", |i| format!("{}", i as i64 * 7_919 - 50_000)),
        ("TEXT", |i| format!("'k-{}-{i:03}'", ["ä", "b", "Z", "é"][i % 4])),
        ("UUID", |i| {
            format!("'{}'", uuid::Uuid::from_u128(0x6f1c_0b9e_0000_4000_8000_0000_0000_0000 + i as u128 * 977))
        }),
        ("TIMESTAMP", |i| format!("TIMESTAMP '2026-01-01 00:00:00' + INTERVAL '{} microseconds'", i * 61_250_123)),
    ];
    for (sql_type, key) in kinds {
        let dir = tempfile::tempdir().unwrap();
        let (store, name, url) = pg_with_users(dir.path(), &[]).await;
        store.query(Stmt::new("DROP TABLE users", Params::new())).await.unwrap();
        store
            .query(Stmt::new(
                format!("CREATE TABLE users (id {sql_type} PRIMARY KEY, email TEXT, name TEXT NOT NULL)"),
                Params::new(),
            ))
            .await
            .unwrap();
        let rows: Vec<String> = (0..57).map(|i| format!("({}, 'k{i}@example.com', 'K {i}')", key(i))).collect();
        store
            .query(Stmt::new(format!("INSERT INTO users (id, email, name) VALUES {}", rows.join(", ")), Params::new()))
            .await
            .unwrap();
        let data_api = Arc::new(FakeDataApi::new(PostgresStore::connect(&url, 8).unwrap()));
        let endpoint = serve_data_api(data_api.clone()).await;
        let target = DataApiTarget { resource_arn: "arn:c".into(), secret_arn: "arn:s".into(), database: name };
        let data_api_store: Arc<dyn SqlStore> =
            Arc::new(DataApiStore::new(DataApiStore::client_from(&sdk_config(&endpoint)), target));
        let mut setup = Setup::new(newsletter_job(10, 3));
        setup.settings.hop_timeout = Duration::from_secs(3);
        setup.settings.hop_margin = Duration::from_secs(1);
        let h = Harness::on_store(crate::support::Backend::Postgres, data_api_store, dir, setup);
        let run = h.start().await;
        let status = h.drive(&run).await;
        assert_eq!(status.status, "succeeded", "{sql_type}: {status:?}");
        assert_eq!((status.total, status.done, status.pages_total), (57, 57, 6), "{sql_type}: {status:?}");
        let sent = h.sent();
        assert!(duplicates(&sent).is_empty(), "{sql_type}");
        assert_eq!(sent.len(), 57, "{sql_type}");
    }
}

/// The emulator is faithful where it matters: an un-hinted string compared with a uuid column
/// fails exactly as Aurora does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_api_emulator_types_parameters_like_the_data_api() {
    let dir = tempfile::tempdir().unwrap();
    let (store, name, url) = pg_with_users(dir.path(), &[]).await;
    store.query(Stmt::new("CREATE TABLE u (id UUID PRIMARY KEY)", Params::new())).await.unwrap();
    let data_api = Arc::new(FakeDataApi::new(PostgresStore::connect(&url, 2).unwrap()));
    let endpoint = serve_data_api(data_api.clone()).await;
    let target = DataApiTarget { resource_arn: "arn:c".into(), secret_arn: "arn:s".into(), database: name };
    let api = DataApiStore::new(DataApiStore::client_from(&sdk_config(&endpoint)), target);
    let id = "6f1c0b9e-0000-4000-8000-000000000001";
    let as_text = Stmt::new("SELECT id FROM u WHERE id > :lo", Params::new().with("lo", id));
    let err = api.query(as_text).await.unwrap_err().to_string();
    assert!(err.contains("operator does not exist: uuid > character varying"), "{err}");
    let as_uuid =
        Stmt::new("SELECT id FROM u WHERE id > :lo", Params::new().with("lo", baton::sql::Value::Uuid(id.into())));
    assert!(api.query(as_uuid).await.unwrap().rows.is_empty());
}
