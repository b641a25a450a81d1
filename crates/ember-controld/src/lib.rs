//! Ember as a cluster: the `ember control` HTTP/JSON server over an
//! [`ember_control::StateStore`]. The wire types and the client are in
//! `ember-api`; the node agent is `ember-node`.
//!
//! * [`server`]: the axum router, the event-driven dispatcher, the
//!   pre-warmer (planning is [`ember_control::prewarm`]) and the
//!   lost-node reaper.
//! * `credentials`: per-node bearer tokens, each bound to one node id.

mod credentials;
pub mod server;
