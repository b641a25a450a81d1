//! Ember as a cluster: the `ember control` HTTP/JSON server over an
//! [`ember_control::StateStore`], and the `ember node` agent that executes
//! runs through the warm pool. The wire types and the client both use are
//! in `ember-api`.
//!
//! * [`server`]: the axum router, the event-driven dispatcher, the
//!   pre-warmer (planning is [`ember_control::prewarm`]) and the
//!   lost-node reaper.
//! * [`node`]: registration, the persistent work stream, run execution,
//!   pre-warmed runners and heartbeats.
//! * `credentials`: per-node bearer tokens, each bound to one node id.

mod credentials;
pub mod node;
pub mod server;
