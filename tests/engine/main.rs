//! The engine's invariants, each proved on SQLite and on a real PostgreSQL server. One test
//! binary (modules below) keeps link times down. Run with `scripts/test`.

mod aws;
mod aws_run;
mod cases;
mod cli;
mod fakes;
mod lambda_mode;
mod moto;
mod support;

/// Instantiates each case once per backend.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::cases::$case(crate::support::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::cases::$case(crate::support::Backend::Postgres).await
                }
            )*
        }
    };
}

on_both_backends!(
    migrations_apply_once_and_are_safe_twice,
    run_sends_each_valid_user_exactly_once,
    duplicated_hop_does_not_fork_its_chain,
    duplicate_deliveries_throughout_a_run_send_nothing_twice,
    start_twice_is_one_run,
    completion_is_marked_exactly_once,
    expired_lease_reoffers_page_without_resending_done_items,
    crash_mid_page_leaves_unknown_never_resent_at_most_once,
    crash_mid_page_is_resent_at_least_once,
    cancel_stops_sends_within_one_page_per_chain,
    pause_then_resume_completes_without_duplicates,
    dropped_hops_are_recovered_by_the_sweeper,
    hop_budget_stops_a_runaway,
    run_deadline_fails_a_run,
    failure_threshold_pauses_the_run,
    account_stop_pauses_the_run_without_losing_items,
    zero_users,
    one_user,
    exact_multiple_of_page_size,
    more_chains_than_pages,
    text_keys,
    uuid_keys,
    sparse_and_negative_keys,
    rate_limited_pages_span_hops,
    sql_kind_runs_one_statement_per_page,
    statements_per_page_are_constant,
    bad_input_changes_nothing,
    database_fault_mid_page_is_recovered,
    randomized_fault_schedules_keep_exactly_once,
    source_column_types_are_read,
    hung_send_is_cut_off_and_only_it_is_unknown,
    whole_run_through_the_lambda_invoke_api_with_duplicates,
);
