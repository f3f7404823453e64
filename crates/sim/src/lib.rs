//! Simulated agents for scale tests: thousands of agents in one process that speak the real
//! agent protocol (register, long-poll orders, numbered status updates acknowledged by
//! `acked_seq`, heartbeats, stop orders, back-off when the master sheds load) to a real master,
//! with a fake executor instead of processes; the pieces of `capstan bench placement` (job
//! generator, `/metrics` reader, `/proc` figures, the raw store write that is the benchmark's
//! physical limit); and scenarios against a master of their own (`capstan sim scenario
//! master-pause`: SIGSTOP past every timeout, then count what the master killed and replaced).
//!
//! Architecture invariant: nothing here reaches into the master; everything goes over HTTP, so
//! a benchmark measures what a real cluster would see.
//! Architecture invariant: the cost of an agent is one tokio task (its long poll) and a small
//! struct; there are no per-agent threads or timers, and every queue and concurrency has a bound
//! (`fleet::POSTS_IN_FLIGHT_MAX`, `fleet::REGISTRATIONS_IN_FLIGHT_MAX`,
//! `fleet::UPDATES_PER_POST_MAX`, `fleet::HEARTBEATS_IN_FLIGHT_MAX`); heartbeats share one heap
//! and one task.
//! Architecture invariant: the fake executor is a pure function of the task's command.

pub mod baseline;
pub mod cli;
pub mod executor;
pub mod fleet;
pub mod jobs;
pub mod master_process;
pub mod os;
pub mod placement;
pub mod prom;
pub mod scenario;

pub use fleet::{Fleet, FleetConfig, StatsSnapshot};
pub use scenario::{master_pause, MasterPauseConfig, MasterPauseReport};
