//! The connection limits `ember cache` and `ember control` share (one set
//! of flags, one server loop: `ember_http`).

use std::time::Duration;

/// Header and idle timeouts and the connection cap of a server.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Seconds a client may take to send a request's head, counted from
    /// the accept for a connection's first request and from the first
    /// byte for later ones.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub header_timeout: u64,
    /// Seconds a connection may stay open with no request in flight, or
    /// with a response the client stopped reading or a request body it
    /// stopped sending. Long responses that progress (node work streams,
    /// `logs -f`, blob downloads) are never cut.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    pub idle_timeout: u64,
    /// Connections open at once; at the cap a new one closes the one idle
    /// longest, or is answered 503 if every connection has a request in
    /// flight [default: 4096, or half the open-file limit if that is lower].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_timeout: 10,
            idle_timeout: 120,
            max_connections: None,
        }
    }
}

impl ServerLimits {
    /// The limits, after raising the soft open-file limit to the hard one
    /// (a server's connection cap is sized by it).
    pub fn limits(&self) -> ember_http::Limits {
        if let Err(e) = ember_http::raise_nofile_limit() {
            tracing::warn!(error = %ember_error::chain(&e), "could not raise the open-file limit");
        }
        ember_http::Limits {
            header_timeout: Duration::from_secs(self.header_timeout.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout.max(1)),
            max_connections: self
                .max_connections
                .unwrap_or_else(ember_http::default_max_connections)
                .max(1),
        }
    }
}
