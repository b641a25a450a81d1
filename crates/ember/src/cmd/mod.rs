//! One module per subcommand.

pub mod bench;
pub mod cache;
pub mod cancel;
pub mod cluster;
pub mod control;
pub mod deploy;
pub mod dircache;
pub mod gc;
pub mod image;
pub mod images;
pub mod logs;
pub mod node;
pub mod nodes;
pub mod pull;
pub mod rmi;
pub mod run;
pub mod runs;
pub mod serving;
pub mod sim;
pub mod snapshot;
pub mod snapshot_transfer;
pub mod store;
pub mod submit;
pub mod up;
