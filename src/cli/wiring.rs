//! Which adapter serves each port, chosen per port from the command line (or environment):
//! `--store sqlite|postgres|data-api`, `--mailer outbox|ses`, `--invoker local|lambda`. AWS
//! clients use the default credential chain and the standard endpoint variables
//! (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_SESV2`, `AWS_ENDPOINT_URL_LAMBDA`,
//! `AWS_ENDPOINT_URL_RDS_DATA`), so each can point at a local fake.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;

use super::Common;
use crate::adapters::aws::data_api::{DataApiStore, DataApiTarget};
use crate::adapters::aws::invoke::LambdaInvoker;
use crate::adapters::aws::ses::SesMailer;
use crate::adapters::postgres::PostgresStore;
use crate::config::Config;
use crate::engine::run::RunStatus;
use crate::engine::{Engine, EngineError, EngineParts};
use crate::jobs::KindRegistry;
use crate::local::driver::{LocalParts, LocalRuntime};
use crate::local::faults::Faults;
use crate::local::outbox::Outbox;
use crate::local::sqlite::SqliteStore;
use crate::ports::{Clock, Mailer, SystemClock};
use crate::sql::SqlStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// `DATA_DIR/baton.db`
    Sqlite,
    /// `--database-url`
    Postgres,
    /// Aurora through the RDS Data API (`--db-cluster-arn`, `--db-secret-arn`, `--db-name`)
    DataApi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MailerKind {
    /// `.eml` files in `DATA_DIR/outbox/`
    Outbox,
    /// Amazon SES v2
    Ses,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InvokerKind {
    /// The in-process model of Lambda's async queue: chains run in this process
    Local,
    /// Lambda `Invoke` (`--function`): chains run in Lambda; this process only watches
    Lambda,
}

impl Common {
    /// The store the flags choose: `--store`, else postgres when `--database-url` is given,
    /// else the embedded SQLite file.
    pub fn store_kind(&self) -> StoreKind {
        self.store.unwrap_or(if self.database_url.is_some() { StoreKind::Postgres } else { StoreKind::Sqlite })
    }
}

async fn shared_aws() -> aws_config::SdkConfig {
    aws_config::load_from_env().await
}

/// What a command may do to the embedded state: commands that only look at or steer existing
/// runs never create a data dir or a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// `status`, `pause`, `cancel`, `tune`: existing state; a config file if there is one.
    Inspect,
    /// `resume`, `sweep`: existing state, and the config (or the run's snapshot) to send with.
    Operate,
    /// `preview`: existing state and sources, and the job's config.
    Preview,
    /// `run`, `start`: may create the state; the job's config is required.
    Create,
}

impl Use {
    fn creates(self) -> bool {
        self == Use::Create
    }

    fn needs_config(self) -> bool {
        matches!(self, Use::Create | Use::Preview)
    }
}

/// The state store chosen by the flags, migrated. With `create` false, a missing SQLite
/// database is an error and nothing is created.
pub async fn open_store(common: &Common, create: bool) -> Result<Arc<dyn SqlStore>> {
    let kind = common.store_kind();
    let store: Arc<dyn SqlStore> = match kind {
        StoreKind::Sqlite => {
            let db = common.data_dir.join("baton.db");
            if !create && !db.exists() {
                bail!(
                    "no baton state in {}: {} does not exist. Start with `baton demo` or `baton run JOB` \
                     (or pass the --data-dir / BATON_DATA_DIR of an earlier run)",
                    common.data_dir.display(),
                    db.display()
                );
            }
            std::fs::create_dir_all(&common.data_dir)
                .with_context(|| format!("cannot create --data-dir {}", common.data_dir.display()))?;
            Arc::new(SqliteStore::open(&db)?)
        }
        StoreKind::Postgres => {
            let Some(url) = &common.database_url else {
                bail!("--store postgres needs --database-url (or BATON_DATABASE_URL)");
            };
            Arc::new(PostgresStore::connect(url, 16)?)
        }
        StoreKind::DataApi => {
            let (Some(resource_arn), Some(secret_arn)) = (&common.db_cluster_arn, &common.db_secret_arn) else {
                bail!(
                    "--store data-api needs --db-cluster-arn and --db-secret-arn (or BATON_DB_CLUSTER_ARN, BATON_DB_SECRET_ARN)"
                );
            };
            let target = DataApiTarget {
                resource_arn: resource_arn.clone(),
                secret_arn: secret_arn.clone(),
                database: common.db_name.clone(),
            };
            Arc::new(DataApiStore::new(DataApiStore::client_from(&shared_aws().await), target))
        }
    };
    crate::sql::migrations::migrate(store.as_ref(), SystemClock.now_ms()).await?;
    Ok(store)
}

async fn open_mailer(common: &Common) -> Result<Arc<dyn Mailer>> {
    Ok(match common.mailer {
        MailerKind::Outbox => Arc::new(
            Outbox::new(&common.data_dir.join("outbox"), Faults::default(), 0, None)
                .with_context(|| format!("cannot create the outbox in {}", common.data_dir.display()))?,
        ),
        MailerKind::Ses => {
            let client = SesMailer::client_from(&shared_aws().await);
            Arc::new(SesMailer::new(client, common.ses_configuration_set.clone()))
        }
    })
}

/// One line saying where this command's mail went.
pub fn where_mail_goes(common: &Common) -> String {
    match common.mailer {
        MailerKind::Outbox => format!(
            "  mail:    one .eml file per message in {} (the embedded outbox; `--mailer ses` sends through SES)",
            common.data_dir.join("outbox").display()
        ),
        MailerKind::Ses => format!(
            "  mail:    sent through SES v2{}",
            common.ses_configuration_set.as_deref().map(|c| format!(", configuration set {c}")).unwrap_or_default()
        ),
    }
}

/// The config file. When it is optional (commands that continue or look at runs) and
/// `--config` is left at its default with no `baton.toml`, the config a demo wrote into the data
/// dir (`DATA_DIR/demo.toml`), so a paused demo resumes; `run`, `start` and `preview`, which
/// need a job of your own, never pick up its throwaway secret.
pub fn load_config(common: &Common, required: bool) -> Result<Config> {
    let demo = common.data_dir.join(super::demo::CONFIG_FILE);
    let defaulted = common.config == std::path::Path::new(super::DEFAULT_CONFIG);
    let fallback = !required && defaulted && !common.config.exists() && demo.exists();
    let path = if fallback { &demo } else { &common.config };
    if !path.exists() {
        if !required {
            return Ok(Config::default());
        }
        bail!(
            "config file {} not found: pass --config PATH or set BATON_CONFIG (README.md, Configuration, has an example)",
            path.display()
        );
    }
    Ok(Config::load(path)?)
}

/// The engine on the chosen adapters: chains run here (local invoker) or in Lambda.
pub enum Runtime {
    Local(LocalRuntime),
    Lambda(Arc<Engine>),
}

impl Runtime {
    pub async fn open(common: &Common, use_: Use) -> Result<Runtime> {
        let config = load_config(common, use_.needs_config())?;
        let store = open_store(common, use_.creates()).await?;
        let mailer = open_mailer(common).await?;
        Ok(match common.invoker {
            InvokerKind::Local => Runtime::Local(LocalRuntime::start(LocalParts {
                store,
                mailer,
                clock: Arc::new(SystemClock),
                config,
                kinds: KindRegistry::default(),
                faults: Faults::default(),
                seed: 0,
            })),
            InvokerKind::Lambda => {
                let Some(function) = &common.function else {
                    bail!("--invoker lambda needs --function NAME (or BATON_FUNCTION): the baton function to invoke");
                };
                let invoker = LambdaInvoker::new(LambdaInvoker::client_from(&shared_aws().await), function);
                Runtime::Lambda(Arc::new(Engine::new(EngineParts {
                    store,
                    invoker: Arc::new(invoker),
                    mailer,
                    clock: Arc::new(SystemClock),
                    config,
                    kinds: KindRegistry::default(),
                })))
            }
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        match self {
            Runtime::Local(local) => &local.engine,
            Runtime::Lambda(engine) => engine,
        }
    }

    /// Local: drives the run here to its end. Lambda: watches it (the chains and the sweep
    /// schedule run in AWS) until it is final or paused.
    pub async fn drive(&self, run_id: &str, show_progress: bool) -> Result<RunStatus, EngineError> {
        match self {
            Runtime::Local(local) => local.drive(run_id, show_progress).await,
            Runtime::Lambda(engine) => loop {
                let progress = engine.progress(run_id).await?;
                if show_progress {
                    eprint!(
                        "\r{}: {}/{} items in done pages, {}/{} pages, {} chains active   ",
                        progress.status,
                        progress.items_done,
                        progress.total,
                        progress.pages_done,
                        progress.pages_total,
                        progress.active_chains
                    );
                }
                if progress.is_settled() {
                    if show_progress {
                        eprintln!();
                    }
                    return Ok(engine.status(Some(run_id)).await?.expect("run exists"));
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            },
        }
    }
}

/// The operator's emergency brake and its release, on `--function`.
pub async fn brake_invoker(common: &Common) -> Result<LambdaInvoker> {
    let Some(function) = &common.function else {
        bail!("--function NAME (or BATON_FUNCTION) names the Lambda function to brake");
    };
    Ok(LambdaInvoker::new(LambdaInvoker::client_from(&shared_aws().await), function))
}
