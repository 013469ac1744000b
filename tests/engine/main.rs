//! The engine's invariants, each proved on SQLite and on a real PostgreSQL server. One test
//! binary (modules below) keeps link times down. Run with `scripts/test`.

mod adversarial;
mod aws;
mod aws_run;
mod bad_input;
mod bench;
mod cases;
mod cli;
mod dashboards;
mod deploy;
mod emulator;
mod fakes;
mod lambda_mode;
mod layout;
mod mime;
mod moto;
mod report;
mod support;
mod suppression;
mod traces;

/// Instantiates each case (`module::case`) once per backend, as `sqlite::case` and
/// `postgres::case`.
macro_rules! on_both_backends {
    ($($module:ident :: $case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::$module::$case(crate::support::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::$module::$case(crate::support::Backend::Postgres).await
                }
            )*
        }
    };
}

on_both_backends!(
    cases::migrations_apply_once_and_are_safe_twice,
    suppression::a_one_click_unsubscribe_is_honoured_by_the_next_run,
    suppression::bad_tokens_and_gets_change_nothing,
    suppression::ses_events_suppress_count_and_replay_harmlessly,
    suppression::malformed_ses_events_change_nothing,
    suppression::removals_hold_against_replays_and_late_deliveries_lift,
    suppression::a_bounce_whose_first_answer_was_lost_still_suppresses,
    traces::every_chain_links_from_its_first_hop_to_its_last_under_chaos,
    report::the_timeline_of_a_chaotic_run_adds_up,
    cases::run_sends_each_valid_user_exactly_once,
    cases::duplicated_hop_does_not_fork_its_chain,
    cases::duplicate_deliveries_throughout_a_run_send_nothing_twice,
    cases::start_twice_is_one_run,
    cases::completion_is_marked_exactly_once,
    cases::expired_lease_reoffers_page_without_resending_done_items,
    cases::crash_mid_page_leaves_unknown_never_resent_at_most_once,
    cases::crash_mid_page_is_resent_at_least_once,
    cases::cancel_stops_sends_within_two_pages_per_chain,
    cases::cancel_stops_a_long_page_within_a_heartbeat,
    cases::pause_then_resume_completes_without_duplicates,
    cases::dropped_hops_are_recovered_by_the_sweeper,
    cases::hop_budget_stops_a_runaway,
    cases::run_deadline_fails_a_run,
    cases::failure_threshold_pauses_the_run,
    cases::account_stop_pauses_the_run_without_losing_items,
    cases::zero_users,
    cases::one_user,
    cases::exact_multiple_of_page_size,
    cases::more_chains_than_pages,
    cases::text_keys,
    cases::uuid_keys,
    cases::sparse_and_negative_keys,
    cases::rate_limited_pages_span_hops,
    cases::send_window_stays_full_across_pages,
    cases::a_page_is_claimed_only_when_a_send_fits_the_hop,
    cases::sql_kind_runs_one_statement_per_page,
    cases::statements_per_page_are_constant,
    cases::bad_input_changes_nothing,
    cases::database_fault_mid_page_is_recovered,
    cases::randomized_fault_schedules_keep_exactly_once,
    cases::source_column_types_are_read,
    cases::hung_send_is_cut_off_and_only_it_is_unknown,
    cases::whole_run_through_the_lambda_invoke_api_with_duplicates,
    adversarial::every_statement_is_safe_when_it_fails_or_its_response_is_lost,
    adversarial::a_lost_response_while_taking_over_claims_loses_nobody,
    adversarial::a_duplicate_key_that_appears_mid_run_is_failed_and_never_sent_twice,
    adversarial::a_writer_that_lost_its_lease_changes_nothing,
    adversarial::a_hop_keeps_to_hop_timeout_whatever_deadline_it_is_given,
    adversarial::a_resume_between_pausing_and_parking_keeps_the_chain_going,
    adversarial::the_sweeper_unparks_chains_of_a_running_run,
    adversarial::concurrent_cold_start_migrations_on_a_fresh_database,
    adversarial::null_keys_are_left_out_and_counted,
    adversarial::at_least_once_resends_what_was_in_flight_at_the_cut_off,
    adversarial::the_sweeper_starts_chains_that_never_ran,
    adversarial::a_chain_losing_hops_at_a_fixed_stride_is_flagged,
    adversarial::a_late_scheduled_start_opens_no_second_run,
    adversarial::a_paused_run_past_its_deadline_fails,
    adversarial::a_page_load_that_outlasts_the_lease_releases_the_page,
    adversarial::a_claim_that_fails_for_good_waits_for_the_page_being_sent,
    adversarial::restarts_resumes_and_parking_survive_a_lost_answer,
    adversarial::claims_of_a_hop_that_died_after_its_run_ended_become_unknown,
    adversarial::at_least_once_gives_up_on_a_recipient_that_is_always_ambiguous,
    adversarial::keys_equal_as_text_are_not_unique,
    adversarial::large_pages_keep_every_statement_under_64_kib,
    adversarial::the_sweeper_skips_a_run_it_cannot_read,
    adversarial::the_send_rate_holds_across_short_hops_and_chains,
    adversarial::tune_changes_a_live_runs_rate_and_chains,
    adversarial::tune_refuses_bad_values,
    adversarial::a_mistyped_key_that_appears_mid_run_is_failed_and_never_sent,
    adversarial::status_counts_item_kinds_from_the_ledger_only,
    adversarial::a_hop_that_cannot_build_its_job_pauses_the_run,
    adversarial::a_source_column_that_disappears_mid_run_pauses_the_run,
    adversarial::status_flags_a_stuck_chain_and_its_last_error,
    adversarial::hop_metrics_add_up_to_the_run,
    adversarial::an_invoke_that_cannot_succeed_pauses_the_run,
    adversarial::template_builtins_are_not_undefined,
    adversarial::tune_down_then_up_brings_ended_chains_back,
    adversarial::a_raised_rate_takes_effect_without_waiting_out_the_old_pace,
);
