//! The states of runs, chains and ledger items, and the one table of transitions between them.
//! Every statement that changes a status takes its allowed `from` states from [`Transition`]
//! (the `status IN (...)` of its `WHERE`), so the rules live here and nowhere else.
//!
//! Runs:
//!
//! | to          | from                                   | when |
//! |-------------|----------------------------------------|------|
//! | `running`   | `planning`                             | the planning transaction ends |
//! | `running`   | `pausing`, `paused`                    | resume (operator) |
//! | `pausing`   | `running`                              | pause (operator, Ctrl-C), failure threshold, the account cannot send |
//! | `paused`    | `pausing`                              | no chain is active any more |
//! | `succeeded` | `running`                              | no page left undone, no item left claimed (exactly once) |
//! | `failed`    | `running`, `pausing`, `paused`         | hop budget exceeded, run deadline passed, a page failed fatally |
//! | `cancelled` | `planning`, `running`, `pausing`, `paused` | cancel (operator) |
//!
//! `succeeded`, `failed` and `cancelled` are final: nothing leaves them.
//!
//! Chains:
//!
//! | to       | from                        | when |
//! |----------|-----------------------------|------|
//! | `ended`  | `active`                    | no page left for it, or the run is over |
//! | `paused` | `active`                    | its hop finds the run pausing (only while it still is) |
//! | `active` | `paused`                    | resume; the sweeper, when the run is running |
//! | `active` | `ended`                     | the sweeper revives one when pages are claimable and none is active |
//! | `failed` | `active`, `paused`, `ended` | the run fails because of this chain (hop budget, deadline) |
//!
//! Ledger items: `claimed` → `done` | `failed` | `skipped` | `unknown` (a result, or a dead
//! owner's claim under at-most-once), or `claimed` → gone (released unattempted; claimed again
//! later). A `claimed` item may change owner (at-least-once takeover). Nothing leaves the other
//! states.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A state stored as lowercase text.
pub trait State: Copy + Sized + 'static {
    const ALL: &'static [Self];
    fn as_str(self) -> &'static str;

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.as_str() == s)
    }
}

/// The `from` states of each transition (see the module docs).
pub trait Transition: State {
    fn from_states(to: Self) -> &'static [Self];
}

/// `'a', 'b'` for a `status IN (...)` clause. The states are fixed words, never user input.
pub fn sql_list<S: State>(states: &[S]) -> String {
    states.iter().map(|s| format!("'{}'", s.as_str())).collect::<Vec<_>>().join(", ")
}

macro_rules! state_enum {
    ($name:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),* }

        impl State for $name {
            const ALL: &'static [Self] = &[$($name::$variant),*];
            fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),* }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }
    };
}

state_enum!(RunState {
    Planning => "planning",
    Running => "running",
    Pausing => "pausing",
    Paused => "paused",
    Succeeded => "succeeded",
    Failed => "failed",
    Cancelled => "cancelled",
});

state_enum!(ChainState {
    Active => "active",
    Paused => "paused",
    Ended => "ended",
    Failed => "failed",
});

state_enum!(ItemState {
    Claimed => "claimed",
    Done => "done",
    Failed => "failed",
    Skipped => "skipped",
    Unknown => "unknown",
});

impl RunState {
    pub fn is_final(self) -> bool {
        matches!(self, RunState::Succeeded | RunState::Failed | RunState::Cancelled)
    }

    /// Final, or waiting for an operator: nothing moves until someone acts.
    pub fn is_settled(self) -> bool {
        self.is_final() || self == RunState::Paused
    }
}

impl Transition for RunState {
    fn from_states(to: Self) -> &'static [Self] {
        use RunState::*;
        match to {
            Planning => &[],
            Running => &[Planning, Pausing, Paused],
            Pausing => &[Running],
            Paused => &[Pausing],
            Succeeded => &[Running],
            Failed => &[Running, Pausing, Paused],
            Cancelled => &[Planning, Running, Pausing, Paused],
        }
    }
}

impl Transition for ChainState {
    fn from_states(to: Self) -> &'static [Self] {
        use ChainState::*;
        match to {
            Active => &[Paused, Ended],
            Paused => &[Active],
            Ended => &[Active],
            Failed => &[Active, Paused, Ended],
        }
    }
}

impl Transition for ItemState {
    fn from_states(to: Self) -> &'static [Self] {
        use ItemState::*;
        match to {
            Claimed => &[],
            Done | Failed | Skipped | Unknown => &[Claimed],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never_leave_final<S: Transition + PartialEq + fmt::Debug>(finals: &[S]) {
        for to in S::ALL {
            for from in S::from_states(*to) {
                assert!(!finals.contains(from), "{from:?} -> {to:?} leaves a final state");
            }
        }
    }

    #[test]
    fn final_states_are_final_and_names_round_trip() {
        never_leave_final(&[RunState::Succeeded, RunState::Failed, RunState::Cancelled]);
        never_leave_final(&[ItemState::Done, ItemState::Failed, ItemState::Skipped, ItemState::Unknown]);
        for s in RunState::ALL {
            assert_eq!(RunState::parse(s.as_str()), Some(*s));
        }
        assert_eq!(sql_list(RunState::from_states(RunState::Failed)), "'running', 'pausing', 'paused'");
        assert!(RunState::Paused.is_settled() && !RunState::Pausing.is_settled());
    }
}
