//! How anything talks to `ember control`: the wire types of its HTTP/JSON
//! API and one client for every endpoint. The CLI, the node agent and the
//! benchmarks depend on this crate, never on the server.
//!
//! * [`wire`]: the types only the wire adds to `ember_control::model`
//!   (work-stream messages, log records, pages, error bodies) and the
//!   parsing rules the server and its clients share (run ids, page sizes).
//! * [`client`]: a small reqwest client for every endpoint.

pub mod client;
pub mod wire;
