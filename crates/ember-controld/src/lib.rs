//! Ember as a cluster: the `ember control` HTTP/JSON server over an
//! [`ember_control::StateStore`], the HTTP client the CLI and nodes use to
//! talk to it, and the `ember node` agent that executes runs through the
//! warm pool.
//!
//! * [`api`]: the wire types only this layer adds (work-stream messages,
//!   log records, error bodies).
//! * [`server`]: the axum router, the event-driven dispatcher, the
//!   pre-warmer and the lost-node reaper.
//! * [`client`]: a small reqwest client for every endpoint.
//! * [`node`]: registration, the persistent work stream, run execution,
//!   pre-warmed runners and heartbeats.
//! * [`prewarm`]: which nodes keep idle runners of which deployment.
//! * `credentials`: per-node bearer tokens, each bound to one node id.

pub mod api;
pub mod client;
mod credentials;
pub mod node;
pub mod prewarm;
pub mod server;
