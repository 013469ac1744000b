//! One function per command: open what the command may touch (see [`Use`]), do it, print it.
//! Text goes to stdout for people, `--json` to stdout for scripts, and notes to stderr.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};

use super::wiring::{self, InvokerKind, Use};
use super::{Common, print_status};
use crate::compose;
use crate::engine::event::ControlAction;
use crate::engine::run::RunStatus;
use crate::engine::state::RunState;
use crate::engine::{Engine, Outcome, Tuned};
use crate::ports::{Clock, SystemClock};
use crate::runtime::Runtime;
use crate::text::{printable, printable_text};

/// `baton run`: start (or continue) a run and drive it to its end here.
pub async fn run(job: &str, run_key: Option<String>, common: &Common) -> Result<ExitCode> {
    let local = wiring::open_runtime(common, Use::Create).await?;
    let started = local.engine().start(job, run_key.as_deref()).await?;
    let Outcome::Started { run_id, existing, .. } = &started else { unreachable!("start returns Started") };
    if *existing {
        let status = local.engine().status(Some(run_id)).await?.expect("exists");
        if status.is_terminal() {
            print_status(&status, common.json);
            eprintln!("run {run_id} of `{job}` already {}; use --run-key for a new run", status.status);
            return Ok(exit_for(&status));
        }
        eprintln!("continuing run {run_id} (already {}); the sweeper restarts its chains", status.status);
        note_drift(local.engine(), run_id, common).await?;
        local.engine().sweep().await?;
    }
    finish(&local, run_id, common).await
}

/// Says which settings of the config file a continued run does not follow.
async fn note_drift(engine: &Engine, run_id: &str, common: &Common) -> Result<()> {
    let drift = engine.config_drift(run_id).await?;
    if !drift.is_empty() {
        eprintln!(
            "note: the run keeps the config it started with; {} now differs:\n  {}\n`baton tune {run_id} \
             --send-rate R --chains K` changes a live run; anything else applies to the next run (--run-key)",
            common.config.display(),
            drift.join("\n  ")
        );
    }
    Ok(())
}

/// `baton status`, with `--list STATE` for the items (or NULL-key rows) to check by hand.
pub async fn status(run_id: Option<String>, list: Option<String>, common: &Common) -> Result<ExitCode> {
    let rt = wiring::open_runtime(common, Use::Inspect).await?;
    let engine = rt.engine();
    let Some(status) = engine.status(run_id.as_deref()).await? else {
        bail!("no runs yet in {}; start one with `baton run JOB` or `baton demo`", where_is(common));
    };
    print_status(&status, common.json);
    match list.as_deref() {
        Some("null-keys") => {
            for row in engine.null_key_rows(&status.run_id, 1000).await? {
                let row: Vec<String> = row.iter().map(|(c, v)| format!("{c}={}", printable(v))).collect();
                println!("null-key\t{}\tthe key column is NULL: left out of the run", row.join(" "));
            }
        }
        Some(state) => {
            for (key, reason) in engine.items_in_state(&status.run_id, state, 1000).await? {
                println!("{state}\t{}\t{}", printable(&key), printable(&reason.unwrap_or_default()));
            }
        }
        None => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// `baton report`: writes the run's page to `out` (through a temporary file, so a failed
/// write leaves no half page) and says where it is.
pub async fn report(run_id: Option<String>, out: &std::path::Path, common: &Common) -> Result<ExitCode> {
    let rt = wiring::open_runtime(common, Use::Inspect).await?;
    let Some(timeline) = rt.engine().timeline(run_id.as_deref()).await? else {
        bail!("no runs yet in {}; start one with `baton run JOB` or `baton demo`", where_is(common));
    };
    let page = crate::report::html(&timeline);
    let partial = out.with_extension("html.partial");
    std::fs::write(&partial, &page)
        .and_then(|()| std::fs::rename(&partial, out))
        .with_context(|| format!("--out {}: cannot write the report", out.display()))?;
    // Hops that ran (duplicate deliveries turned away are drawn, not counted).
    let hops = timeline.hops.iter().filter(|h| h.outcome.as_deref() != Some("duplicate")).count();
    if common.json {
        let summary =
            serde_json::json!({ "run_id": timeline.status.run_id, "out": out, "hops": hops, "bytes": page.len() });
        println!("{summary}");
    } else {
        println!("wrote {} (run {}, {} hops): open it in a browser", out.display(), timeline.status.run_id, hops);
    }
    Ok(ExitCode::SUCCESS)
}

/// `baton pause` and `baton cancel`.
pub async fn control(common: &Common, run_id: Option<String>, action: ControlAction) -> Result<ExitCode> {
    let rt = wiring::open_runtime(common, Use::Inspect).await?;
    let engine = rt.engine();
    let id = latest_or(engine, run_id, common).await?;
    let outcome = engine.control(&id, action).await?;
    if common.json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else if let Outcome::Controlled { status, .. } = outcome {
        println!("run {id} is now {status}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `baton resume`: resume, then drive the run to its end here.
pub async fn resume(run_id: Option<String>, common: &Common) -> Result<ExitCode> {
    let local = wiring::open_runtime(common, Use::Operate).await?;
    let id = latest_or(local.engine(), run_id, common).await?;
    local.engine().control(&id, ControlAction::Resume).await?;
    finish(&local, &id, common).await
}

/// `baton tune`: a live run's send rate and chain count.
pub async fn tune(
    run_id: Option<String>,
    send_rate: Option<f64>,
    chains: Option<u32>,
    common: &Common,
) -> Result<ExitCode> {
    if send_rate.is_none() && chains.is_none() {
        bail!("say what to change: --send-rate R and/or --chains K");
    }
    let rt = wiring::open_runtime(common, Use::Inspect).await?;
    let id = latest_or(rt.engine(), run_id, common).await?;
    let invoke_new = common.invoker == InvokerKind::Lambda;
    let tuned = rt.engine().tune(&id, send_rate, chains, invoke_new).await?;
    if common.json {
        println!("{}", serde_json::to_string(&tuned)?);
    } else {
        println!("{}", describe_tuned(&id, &tuned, invoke_new));
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_tuned(id: &str, tuned: &Tuned, invoke_new: bool) -> String {
    let rate = |r: Option<f64>| r.map(|r| format!("{r}/s")).unwrap_or_else(|| "-".into());
    format!(
        "run {id}: send_rate {} -> {}, chains {} -> {}, hop budget {} -> {}{}",
        rate(tuned.send_rate.0),
        rate(tuned.send_rate.1),
        tuned.chains.0,
        tuned.chains.1,
        tuned.max_hops.0,
        tuned.max_hops.1,
        match (tuned.chains_added, invoke_new) {
            (0, _) => String::new(),
            (n, true) => format!("; {n} new chain(s) invoked"),
            (n, false) => format!("; {n} new chain(s) start with the next sweep of the process driving the run"),
        }
    )
}

/// `baton sweep`: restart stuck chains, then drive a restarted run to its end here.
pub async fn sweep(common: &Common) -> Result<ExitCode> {
    let local = wiring::open_runtime(common, Use::Operate).await?;
    let report = local.engine().sweep().await?;
    if common.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "swept {} open run(s): {} chain(s) restarted, {} revived, {} parked, {} completed, {} failed",
            report.runs, report.restarted, report.revived, report.parked, report.completed, report.failed
        );
    }
    if report.restarted + report.revived > 0
        && let Some(status) = local.engine().status(None).await?
        && !status.is_terminal()
    {
        return finish(&local, &status.run_id, common).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// `baton migrate`: create or upgrade baton's tables, and say which versions this applied.
pub async fn migrate(common: &Common) -> Result<ExitCode> {
    use crate::sql::migrations;
    let settings = common.adapter_settings()?;
    let store = compose::connect_store(&settings, true, &compose::Aws::default()).await?;
    let applied = migrations::migrate(store.as_ref(), SystemClock.now_ms()).await?;
    let (version, known) = (migrations::store_version(store.as_ref()).await?, migrations::latest_version());
    let target = common.store_description();
    if common.json {
        let answer = serde_json::json!({ "store": target, "schema_version": version, "applied": applied });
        println!("{answer}");
    } else if applied.is_empty() {
        println!("{target}: baton's tables are at schema version {version}: nothing to apply");
    } else {
        let list = applied.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
        println!("{target}: applied schema version(s) {list}; baton's tables are at version {version}");
    }
    if version > known {
        eprintln!(
            "warning: {target} is at schema version {version}, newer than this baton knows ({known}): a newer \
             baton migrated it; use that one"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `baton start`: start a run in Lambda and return.
pub async fn start(job: &str, run_key: Option<String>, common: &Common) -> Result<ExitCode> {
    if common.invoker == InvokerKind::Local {
        // Local chains live in this process: returning would kill them mid-page.
        bail!(
            "`baton start` returns at once, and with the local invoker the chains would die with this process: \
             use `baton run {job}` (drives the run to its end here), or `--invoker lambda --function NAME` to run \
             the chains in Lambda"
        );
    }
    let rt = wiring::open_runtime(common, Use::Create).await?;
    let outcome = rt.engine().start(job, run_key.as_deref()).await?;
    if common.json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else if let Outcome::Started { run_id, chains, pages, items, existing } = outcome {
        let verb = if existing { "already exists" } else { "started" };
        println!("run {run_id} {verb}: {items} items in {pages} pages, {chains} chains");
    }
    Ok(ExitCode::SUCCESS)
}

/// `baton brake`: reserved concurrency 0 on the function.
pub async fn brake(common: &Common) -> Result<ExitCode> {
    let before = wiring::brake_invoker(common).await?.brake().await?;
    println!(
        "braked: reserved concurrency is 0 (it was {}). `baton release{}` undoes it",
        before.map(|n| n.to_string()).unwrap_or_else(|| "unreserved".into()),
        before.map(|n| format!(" --concurrency {n}")).unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

/// `baton release`: the brake's undo.
pub async fn release(concurrency: Option<i32>, common: &Common) -> Result<ExitCode> {
    wiring::brake_invoker(common).await?.release(concurrency).await?;
    println!(
        "released: reserved concurrency {}",
        concurrency.map(|n| n.to_string()).unwrap_or_else(|| "removed".into())
    );
    Ok(ExitCode::SUCCESS)
}

/// `baton preview`: one item as its kind would process it, with nothing sent.
pub async fn preview(job: &str, key: Option<String>, common: &Common) -> Result<ExitCode> {
    let rt = wiring::open_runtime(common, Use::Preview).await?;
    match rt.engine().preview(job, key.as_deref()).await? {
        None => bail!("no recipient found{}", key.map(|k| format!(" with key {k}")).unwrap_or_default()),
        Some(p) if common.json => println!("{}", p.json),
        Some(p) => {
            for (name, value) in &p.headers {
                println!("{name}: {}", printable(value));
            }
            for (name, body) in &p.bodies {
                println!("\n--- {name} ---\n{}", printable_text(body));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn latest_or(engine: &Engine, run_id: Option<String>, common: &Common) -> Result<String> {
    match run_id {
        Some(id) => Ok(id),
        None => match engine.status(None).await? {
            Some(s) => Ok(s.run_id),
            None => bail!("no runs yet in {}", where_is(common)),
        },
    }
}

/// Drives the run to its end (or a pause), prints its status, and exits by its state.
async fn finish(local: &Runtime, run_id: &str, common: &Common) -> Result<ExitCode> {
    let status = local.drive(run_id, !common.json && std::io::IsTerminal::is_terminal(&std::io::stderr())).await?;
    print_status(&status, common.json);
    if !common.json {
        eprintln!("{}", wiring::where_mail_goes(common));
    }
    Ok(exit_for(&status))
}

/// 0 when the run succeeded, 3 when it is paused (it continues with `baton resume`), 1 else.
fn exit_for(status: &RunStatus) -> ExitCode {
    match status.status {
        RunState::Succeeded => ExitCode::SUCCESS,
        RunState::Paused => ExitCode::from(3),
        _ => ExitCode::FAILURE,
    }
}

fn where_is(common: &Common) -> String {
    match common.database_url() {
        Some(_) => "the PostgreSQL database".into(),
        None => common.data_dir.join("baton.db").display().to_string(),
    }
}
