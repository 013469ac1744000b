//! Which adapter serves each port, chosen per port from the command line (or environment):
//! `--store sqlite|postgres|data-api`, `--mailer outbox|ses`, `--invoker local|lambda`. AWS
//! clients use the default credential chain and the standard endpoint variables
//! (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_SESV2`, `AWS_ENDPOINT_URL_LAMBDA`,
//! `AWS_ENDPOINT_URL_RDS_DATA`), so each can point at a local fake.

use anyhow::{Result, bail};
use clap::ValueEnum;

use super::Common;
use crate::adapters::aws::data_api::DataApiTarget;
use crate::adapters::aws::invoke::LambdaInvoker;
use secrecy::{ExposeSecret, SecretString};

use crate::compose::{self, AdapterSettings, Aws, InvokerSettings, MailerSettings, StoreSettings};
use crate::config::Config;
use crate::runtime::Runtime;
use crate::text::printable_short;

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
    /// The store the flags choose: `--store`, else postgres when `--database-url` is given, else
    /// the Data API when `--db-cluster-arn` is, else the embedded SQLite file.
    pub fn store_kind(&self) -> StoreKind {
        self.store.unwrap_or(if self.database_url().is_some() {
            StoreKind::Postgres
        } else if given(&self.db_cluster_arn).is_some() {
            StoreKind::DataApi
        } else {
            StoreKind::Sqlite
        })
    }

    /// Where state lives, for people: the SQLite file, the PostgreSQL database (no credentials),
    /// or the cluster and database of the Data API.
    pub fn store_description(&self) -> String {
        match self.store_kind() {
            StoreKind::Sqlite => format!("SQLite {}", self.data_dir.join("baton.db").display()),
            StoreKind::Postgres => postgres_description(self.database_url().map_or("", |u| u.expose_secret())),
            StoreKind::DataApi => format!(
                "Aurora {} (database {}) through the Data API",
                given(&self.db_cluster_arn).map_or("?", String::as_str),
                self.db_name
            ),
        }
    }

    /// `--database-url`; an empty value (`BATON_DATABASE_URL=`) counts as unset, as in Lambda.
    pub fn database_url(&self) -> Option<&SecretString> {
        self.database_url.as_ref().filter(|u| !u.expose_secret().is_empty())
    }
}

/// A PostgreSQL URL or key=value connection string as its database and hosts, never its user or
/// password (they are not printed even when the string does not parse).
pub fn postgres_description(url: &str) -> String {
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return "PostgreSQL (a connection string that does not parse)".into();
    };
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let database = config.get_dbname().unwrap_or("(the user's default)");
    format!("PostgreSQL database {} on {}", printable_short(database), printable_short(&hosts.join(",")))
}

/// A flag's value, where an empty one (an empty environment variable) counts as unset.
fn given(value: &Option<String>) -> Option<&String> {
    value.as_ref().filter(|v| !v.is_empty())
}

impl Common {
    /// The typed adapter settings these flags (and their environment fallbacks) choose; a
    /// missing flag is named with its variable.
    pub fn adapter_settings(&self) -> Result<AdapterSettings> {
        // As in Lambda: with both, a guess could point at another database, whose empty state
        // would start this month's run again.
        if self.store.is_none() && self.database_url().is_some() && given(&self.db_cluster_arn).is_some() {
            bail!(
                "both --database-url and --db-cluster-arn are set (or BATON_DATABASE_URL and BATON_DB_CLUSTER_ARN): \
                 say --store postgres or --store data-api"
            );
        }
        let store = match self.store_kind() {
            StoreKind::Sqlite => StoreSettings::Sqlite { path: self.data_dir.join("baton.db") },
            StoreKind::Postgres => {
                let Some(url) = self.database_url() else {
                    bail!("--store postgres needs --database-url (or BATON_DATABASE_URL)");
                };
                StoreSettings::Postgres { url: url.clone() }
            }
            StoreKind::DataApi => {
                let (Some(resource_arn), Some(secret_arn)) = (given(&self.db_cluster_arn), given(&self.db_secret_arn))
                else {
                    bail!(
                        "--store data-api needs --db-cluster-arn and --db-secret-arn (or BATON_DB_CLUSTER_ARN, \
                         BATON_DB_SECRET_ARN)"
                    );
                };
                // An empty variable means unset, as in Lambda mode.
                let database = Some(self.db_name.clone()).filter(|d| !d.is_empty());
                StoreSettings::DataApi(DataApiTarget {
                    resource_arn: resource_arn.clone(),
                    secret_arn: secret_arn.clone(),
                    database: database.unwrap_or_else(|| compose::DEFAULT_DB_NAME.into()),
                })
            }
        };
        let mailer = match self.mailer {
            MailerKind::Outbox => MailerSettings::Outbox { dir: self.data_dir.join("outbox") },
            MailerKind::Ses => MailerSettings::Ses { configuration_set: given(&self.ses_configuration_set).cloned() },
        };
        let invoker = match (self.invoker, given(&self.function)) {
            (InvokerKind::Local, _) => InvokerSettings::Local,
            (InvokerKind::Lambda, Some(function)) => InvokerSettings::Lambda { function: function.clone() },
            (InvokerKind::Lambda, None) => {
                bail!("--invoker lambda needs --function NAME (or BATON_FUNCTION): the baton function to invoke")
            }
        };
        Ok(AdapterSettings { store, mailer, invoker })
    }
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
    /// `suppress`, `serve`: may create the state (a suppression list can come before the first
    /// run); a config file if there is one (`serve` verifies links with its jobs' secrets).
    Record,
}

impl Use {
    fn creates(self) -> bool {
        matches!(self, Use::Create | Use::Record)
    }

    fn needs_config(self) -> bool {
        matches!(self, Use::Create | Use::Preview)
    }
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
            given(&common.ses_configuration_set).map(|c| format!(", configuration set {c}")).unwrap_or_default()
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

/// The engine on the adapters the flags choose, for a command that may do `use_`.
pub async fn open_runtime(common: &Common, use_: Use) -> Result<Runtime> {
    let config = load_config(common, use_.needs_config())?;
    Ok(compose::build(&common.adapter_settings()?, config, use_.creates(), &Aws::default()).await?)
}

/// The operator's emergency brake and its release, on `--function`.
pub async fn brake_invoker(common: &Common) -> Result<LambdaInvoker> {
    let Some(function) = given(&common.function) else {
        bail!("--function NAME (or BATON_FUNCTION) names the Lambda function to brake");
    };
    Ok(compose::lambda_invoker(function, &Aws::default()).await)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_postgres_description_never_shows_the_user_or_password() {
        for url in [
            "postgres://baton:hunter2@db.example.com:5432/news?sslmode=require",
            "postgres://baton:hunter2@db.example.com/news",
            "host=db.example.com user=baton password=hunter2 dbname=news",
        ] {
            let said = super::postgres_description(url);
            assert_eq!(said, "PostgreSQL database news on db.example.com", "{url}");
        }
        let said = super::postgres_description("postgres://baton:hunter2@db.example.com");
        assert!(!said.contains("hunter2") && !said.contains("baton"), "{said}");
        let said = super::postgres_description("postgres://baton:hunter2@[not a url");
        assert!(!said.contains("hunter2"), "{said}");
    }
}
