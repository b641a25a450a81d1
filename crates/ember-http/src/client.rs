//! How Ember's HTTP clients are started: one place for the TLS set-up
//! every `reqwest` client needs.

/// A `reqwest` client builder for talking to the servers at `urls`.
///
/// It installs ring as rustls's crypto provider (reqwest is built without
/// a default one; a second install is refused harmlessly). When `urls` is
/// not empty and every one of them is plain `http://`, the client trusts
/// no CA certificates, so building it does not read the system's
/// certificate store: rustls's platform verifier parses every file in
/// `/etc/ssl/certs`, a few milliseconds of CPU that each CLI command would
/// otherwise pay for a connection that never uses TLS. Otherwise (any
/// `https://` URL, or servers not known yet: pass an empty slice) the
/// system's CA certificates are trusted as usual.
pub fn builder(urls: &[&str]) -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let b = reqwest::Client::builder();
    if plain_http_only(urls) {
        b.tls_certs_only(std::iter::empty())
    } else {
        b
    }
}

/// Whether `urls` is non-empty and names only plain-HTTP servers.
fn plain_http_only(urls: &[&str]) -> bool {
    !urls.is_empty()
        && urls.iter().all(|u| {
            u.get(..7)
                .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_list_of_plain_http_servers_skips_the_ca_store() {
        assert!(plain_http_only(&["http://127.0.0.1:5000"]));
        assert!(plain_http_only(&["HTTP://cache:80", "http://b"]));
        assert!(!plain_http_only(&[]));
        assert!(!plain_http_only(&["http://a", "https://b"]));
        assert!(!plain_http_only(&["https://a"]));
        assert!(!plain_http_only(&["htt"]));
    }
}
