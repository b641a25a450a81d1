//! The Ember node agent.
mod agent;
pub use agent::*;
