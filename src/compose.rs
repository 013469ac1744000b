//! The composition root: the one place that chooses and builds adapters and puts the engine
//! together. Lambda mode, every CLI command, the demo and the tests' harness all come through
//! here, so a setting cannot mean one thing in Lambda and another on the command line.
//!
//! - [`AdapterSettings`]: which adapter serves each port, with its endpoint and secrets, typed.
//!   Read once: by clap with environment fallbacks for the CLI (`cli::wiring`), from the
//!   environment alone in Lambda ([`AdapterSettings::from_env`]).
//! - [`open_store`] (migrated; [`connect_store`] as it is), [`open_mailer`]: one adapter each,
//!   from its settings.
//! - [`build`]: settings to a running engine, for Lambda mode and every command; the demo and
//!   the tests, which wrap adapters (faults, counting, test doubles), call the steps below.
//! - [`Adapters`] + [`assemble`]: the engine's parts, on the local Lambda model (a
//!   [`LocalRuntime`] running the chains in this process) or on Lambda `Invoke` (the chains run
//!   in AWS); [`Adapters::engine_parts`] is the single mapping from adapters to parts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::OnceCell;

use crate::adapters::aws::data_api::{DataApiStore, DataApiTarget};
use crate::adapters::aws::invoke::LambdaInvoker;
use crate::adapters::aws::ses::SesMailer;
use crate::adapters::local::faults::Faults;
use crate::adapters::local::outbox::Outbox;
use crate::adapters::local::sqlite::SqliteStore;
use crate::adapters::postgres::PostgresStore;
use crate::config::Config;
use crate::engine::{Engine, EngineParts, Tracing};
use crate::jobs::KindRegistry;
use crate::ports::{Clock, Invoker, Mailer, SystemClock};
use crate::runtime::{LocalRuntime, Runtime};
use crate::sql::{SqlError, SqlStore};

/// The database name for the Data API when none is given (`BATON_DB_NAME`), in Lambda and on
/// the command line alike.
pub const DEFAULT_DB_NAME: &str = "baton";

/// The state store and job sources.
#[derive(Debug, Clone)]
pub enum StoreSettings {
    /// One SQLite file (the embedded default).
    Sqlite { path: PathBuf },
    /// A direct PostgreSQL connection.
    Postgres { url: SecretString },
    /// Aurora PostgreSQL through the RDS Data API.
    DataApi(DataApiTarget),
}

/// Where mail goes.
#[derive(Debug, Clone)]
pub enum MailerSettings {
    /// One `.eml` file per message in `dir`.
    Outbox { dir: PathBuf },
    /// Amazon SES v2, with an optional configuration set.
    Ses { configuration_set: Option<String> },
}

/// How a chain invokes its next hop.
#[derive(Debug, Clone)]
pub enum InvokerSettings {
    /// The in-process model of Lambda's asynchronous queue: the chains run in this process.
    Local,
    /// Lambda `Invoke` on this function (name or ARN): the chains run in Lambda.
    Lambda { function: String },
}

/// Which adapter serves each port.
#[derive(Debug, Clone)]
pub struct AdapterSettings {
    pub store: StoreSettings,
    pub mailer: MailerSettings,
    pub invoker: InvokerSettings,
}

/// A setting that is missing or wrong, or an adapter that cannot be built from it.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error("{setting} is not set: {why}")]
    Missing { setting: &'static str, why: &'static str },
    #[error("{setting} must be {expected}, not `{got}`")]
    Invalid { setting: &'static str, expected: &'static str, got: String },
    #[error("no baton state in {dir}: {db} does not exist. Start with `baton demo` or `baton run JOB` (or pass the --data-dir / BATON_DATA_DIR of an earlier run)", dir = .dir.display(), db = .db.display())]
    NoState { dir: PathBuf, db: PathBuf },
    #[error("cannot create {what} {}: {source}", .path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] SqlError),
}

impl AdapterSettings {
    /// Lambda mode's settings, from the environment only (README.md, "Lambda mode"):
    /// `BATON_STORE` (`data-api`, the default, or `postgres`, the default when
    /// `BATON_DATABASE_URL` is set), `BATON_DB_CLUSTER_ARN`,
    /// `BATON_DB_SECRET_ARN`, `BATON_DB_NAME`, `BATON_DATABASE_URL`,
    /// `BATON_SES_CONFIGURATION_SET`, and Lambda's own `AWS_LAMBDA_FUNCTION_NAME` (the function
    /// a hop invokes next: itself).
    pub fn from_env() -> Result<AdapterSettings, ComposeError> {
        Self::from_vars(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// [`Self::from_env`] over any source of variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<AdapterSettings, ComposeError> {
        let required =
            |name: &'static str, why: &'static str| var(name).ok_or(ComposeError::Missing { setting: name, why });
        // As on the command line: a database URL alone means PostgreSQL. With the Data API's
        // settings too, guessing could move a deployed function to another database (whose
        // empty state would start this month's run again): say which.
        let default_store = match (var("BATON_DATABASE_URL").is_some(), var("BATON_DB_CLUSTER_ARN").is_some()) {
            (true, true) if var("BATON_STORE").is_none() => {
                return Err(ComposeError::Missing {
                    setting: "BATON_STORE",
                    why: "both BATON_DATABASE_URL and BATON_DB_CLUSTER_ARN are set: say `data-api` or `postgres`",
                });
            }
            (true, false) => "postgres",
            _ => "data-api",
        };
        let store = match var("BATON_STORE").as_deref().unwrap_or(default_store) {
            "data-api" => StoreSettings::DataApi(DataApiTarget {
                resource_arn: required("BATON_DB_CLUSTER_ARN", "the Aurora cluster's ARN, for the Data API")?,
                secret_arn: required("BATON_DB_SECRET_ARN", "the database secret's ARN, for the Data API")?,
                database: var("BATON_DB_NAME").unwrap_or_else(|| DEFAULT_DB_NAME.into()),
            }),
            "postgres" => StoreSettings::Postgres {
                url: required("BATON_DATABASE_URL", "the PostgreSQL URL, for BATON_STORE=postgres")?.into(),
            },
            other => {
                return Err(ComposeError::Invalid {
                    setting: "BATON_STORE",
                    expected: "`data-api` or `postgres`",
                    got: crate::text::printable_short(other),
                });
            }
        };
        let configuration_set = var("BATON_SES_CONFIGURATION_SET");
        let function = required("AWS_LAMBDA_FUNCTION_NAME", "Lambda sets it; a hop invokes its own function")?;
        Ok(AdapterSettings {
            store,
            mailer: MailerSettings::Ses { configuration_set },
            invoker: InvokerSettings::Lambda { function },
        })
    }
}

/// The shared AWS configuration (default credential chain, `AWS_ENDPOINT_URL_*`), loaded once
/// and only if an AWS adapter is chosen.
#[derive(Default)]
pub struct Aws(OnceCell<aws_config::SdkConfig>);

impl Aws {
    pub async fn config(&self) -> &aws_config::SdkConfig {
        self.0.get_or_init(aws_config::load_from_env).await
    }
}

/// Connections a PostgreSQL store keeps. A Lambda sandbox runs one hop at a time; the local
/// runtime runs up to `reserved_concurrency` hops in one process.
fn postgres_pool(invoker: &InvokerSettings) -> usize {
    match invoker {
        InvokerSettings::Lambda { .. } => 4,
        InvokerSettings::Local => 16,
    }
}

/// The state store, migrated. With `create` false, a missing SQLite database is an error and
/// nothing is created (commands that only look at or steer runs).
pub async fn open_store(
    settings: &AdapterSettings,
    create: bool,
    aws: &Aws,
) -> Result<Arc<dyn SqlStore>, ComposeError> {
    let store = connect_store(settings, create, aws).await?;
    crate::sql::migrations::migrate(store.as_ref(), SystemClock.now_ms()).await?;
    Ok(store)
}

/// The state store as it is, not migrated (`baton migrate` reports what it applies).
pub async fn connect_store(
    settings: &AdapterSettings,
    create: bool,
    aws: &Aws,
) -> Result<Arc<dyn SqlStore>, ComposeError> {
    let store: Arc<dyn SqlStore> = match &settings.store {
        StoreSettings::Sqlite { path } => {
            let dir = path.parent().unwrap_or(Path::new("."));
            if !create && !path.exists() {
                return Err(ComposeError::NoState { dir: dir.to_owned(), db: path.clone() });
            }
            std::fs::create_dir_all(dir).map_err(|source| ComposeError::Io {
                what: "--data-dir",
                path: dir.to_owned(),
                source,
            })?;
            Arc::new(SqliteStore::open(path)?)
        }
        StoreSettings::Postgres { url } => {
            Arc::new(PostgresStore::connect(url.expose_secret(), postgres_pool(&settings.invoker))?)
        }
        StoreSettings::DataApi(target) => {
            Arc::new(DataApiStore::new(DataApiStore::client_from(aws.config().await), target.clone()))
        }
    };
    Ok(store)
}

/// A mail adapter, keeping its concrete type where a caller reads its counters (the demo reads
/// the outbox's ambiguous sends).
pub enum OpenedMailer {
    Outbox(Arc<Outbox>),
    Ses(Arc<SesMailer>),
}

impl OpenedMailer {
    pub fn port(&self) -> Arc<dyn Mailer> {
        match self {
            OpenedMailer::Outbox(o) => o.clone(),
            OpenedMailer::Ses(s) => s.clone(),
        }
    }
}

/// The mail adapter; the outbox injects `faults` (decided by `seed`), SES never does.
pub async fn open_mailer(
    settings: &MailerSettings,
    faults: &Faults,
    seed: u64,
    aws: &Aws,
) -> Result<OpenedMailer, ComposeError> {
    Ok(match settings {
        MailerSettings::Outbox { dir } => OpenedMailer::Outbox(Arc::new(
            Outbox::new(dir, faults.clone(), seed, None).map_err(|source| ComposeError::Io {
                what: "the outbox",
                path: dir.clone(),
                source,
            })?,
        )),
        MailerSettings::Ses { configuration_set } => OpenedMailer::Ses(Arc::new(SesMailer::new(
            SesMailer::client_from(aws.config().await),
            configuration_set.clone(),
        ))),
    })
}

/// Lambda `Invoke` on `function` (the next hop, and the operator's brake).
pub async fn lambda_invoker(function: &str, aws: &Aws) -> LambdaInvoker {
    LambdaInvoker::new(LambdaInvoker::client_from(aws.config().await), function)
}

/// Everything but the next-hop port: what [`assemble`] turns into an engine.
pub struct Adapters {
    pub store: Arc<dyn SqlStore>,
    pub mailer: Arc<dyn Mailer>,
    pub clock: Arc<dyn Clock>,
    pub config: Config,
    pub kinds: KindRegistry,
    /// Faults the local Lambda model injects (none outside `--chaos` and tests).
    pub faults: Faults,
    pub seed: u64,
    /// Where spans go: the global tracer (set up by [`crate::telemetry`]) unless a test gives
    /// its own.
    pub tracing: Tracing,
}

impl Adapters {
    /// The system clock, the built-in kinds and no faults.
    pub fn new(store: Arc<dyn SqlStore>, mailer: Arc<dyn Mailer>, config: Config) -> Adapters {
        Adapters {
            store,
            mailer,
            clock: Arc::new(SystemClock),
            config,
            kinds: KindRegistry::default(),
            faults: Faults::default(),
            seed: 0,
            tracing: Tracing::default(),
        }
    }

    /// The engine's parts with `invoker` as the next-hop port: the one place they are put
    /// together.
    pub fn engine_parts(self, invoker: Arc<dyn Invoker>) -> EngineParts {
        EngineParts {
            store: self.store,
            invoker,
            mailer: self.mailer,
            clock: self.clock,
            config: self.config,
            kinds: self.kinds,
            tracing: self.tracing,
        }
    }
}

/// The whole way from settings to a running engine, as Lambda mode and every command take it:
/// the store (migrated; created only when `create`), the mailer, no faults, then [`assemble`].
pub async fn build(
    settings: &AdapterSettings,
    config: Config,
    create: bool,
    aws: &Aws,
) -> Result<Runtime, ComposeError> {
    let store = open_store(settings, create, aws).await?;
    let mailer = open_mailer(&settings.mailer, &Faults::default(), 0, aws).await?;
    Ok(assemble(Adapters::new(store, mailer.port(), config), &settings.invoker, aws).await)
}

/// The engine on `adapters`, its chains running here (local invoker) or in Lambda.
pub async fn assemble(adapters: Adapters, invoker: &InvokerSettings, aws: &Aws) -> Runtime {
    match invoker {
        InvokerSettings::Local => Runtime::Local(LocalRuntime::start(adapters)),
        InvokerSettings::Lambda { function } => {
            let invoker = Arc::new(lambda_invoker(function, aws).await);
            Runtime::Remote(Arc::new(Engine::new(adapters.engine_parts(invoker))))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<AdapterSettings, ComposeError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        AdapterSettings::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn lambda_settings_name_the_missing_variable_and_default_like_the_cli() {
        let err = settings(&[("AWS_LAMBDA_FUNCTION_NAME", "baton")]).unwrap_err().to_string();
        assert!(err.contains("BATON_DB_CLUSTER_ARN"), "{err}");
        let ok = settings(&[
            ("AWS_LAMBDA_FUNCTION_NAME", "baton"),
            ("BATON_DB_CLUSTER_ARN", "arn:c"),
            ("BATON_DB_SECRET_ARN", "arn:s"),
        ])
        .unwrap();
        // Failed before: Lambda required BATON_DB_NAME while the CLI defaulted it to `baton`.
        let StoreSettings::DataApi(target) = &ok.store else { panic!("{ok:?}") };
        assert_eq!(target.database, DEFAULT_DB_NAME);
        assert!(matches!(&ok.invoker, InvokerSettings::Lambda { function } if function == "baton"));
        let err = settings(&[("AWS_LAMBDA_FUNCTION_NAME", "f"), ("BATON_STORE", "mysql")]).unwrap_err().to_string();
        assert!(err.contains("BATON_STORE") && err.contains("`data-api` or `postgres`"), "{err}");
        // Both databases configured and none chosen: refused, never guessed.
        let both = [
            ("AWS_LAMBDA_FUNCTION_NAME", "f"),
            ("BATON_DB_CLUSTER_ARN", "arn:c"),
            ("BATON_DB_SECRET_ARN", "arn:s"),
            ("BATON_DATABASE_URL", "postgres://db/baton"),
        ];
        let err = settings(&both).unwrap_err().to_string();
        assert!(err.contains("BATON_STORE"), "{err}");
        let url_only =
            settings(&[("AWS_LAMBDA_FUNCTION_NAME", "f"), ("BATON_DATABASE_URL", "postgres://db/b")]).unwrap();
        assert!(matches!(url_only.store, StoreSettings::Postgres { .. }), "{url_only:?}");
    }

    #[test]
    fn settings_never_print_the_database_url() {
        let s = settings(&[
            ("AWS_LAMBDA_FUNCTION_NAME", "f"),
            ("BATON_STORE", "postgres"),
            ("BATON_DATABASE_URL", "postgres://baton:hunter2-secret@db/baton"),
        ])
        .unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(matches!(&s.store, StoreSettings::Postgres { url } if url.expose_secret().contains("hunter2")));
    }
}
