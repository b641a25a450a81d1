//! One module per subcommand.

pub mod bench;
pub mod cache;
pub mod gc;
pub mod image;
pub mod images;
pub mod pull;
pub mod rmi;
pub mod run;
