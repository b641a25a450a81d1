//! `ember sim`: replays a launch trace through the real pull planner,
//! scheduler and GC order of `ember-control` (not copies of their logic)
//! with modelled pull bandwidth and start times, beside two baselines on
//! the same trace and disks. The trace format is in `docs/sim.md`.
//!
//! * [`trace`]: reading and writing the JSON-lines trace.
//! * [`generate`]: a trace generator with the published skew and a
//!   changing tail.
//! * [`replay`]: the replay and its report.

pub mod generate;
pub mod replay;
pub mod trace;
