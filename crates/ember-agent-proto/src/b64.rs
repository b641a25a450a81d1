//! Standard base64 (RFC 4648, with padding) for binary fields in JSON.
//!
//! Base64 rather than a JSON array of numbers, which would cost up to four
//! bytes per byte.

use base64::Engine as _;

/// Encodes `data` as padded base64.
pub fn encode(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Decodes padded base64; `None` if it is not valid.
pub fn decode(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// `#[serde(with = "b64::option")]` for `Option<Vec<u8>>`.
pub mod option {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Serializes as a base64 string, or `null`.
    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) => s.serialize_str(&super::encode(bytes)),
            None => s.serialize_none(),
        }
    }

    /// Deserializes a base64 string, or `null`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => super::decode(&s)
                .map(Some)
                .ok_or_else(|| D::Error::custom("invalid base64")),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4648_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(encode(plain.as_bytes()), enc);
            assert_eq!(decode(enc).as_deref(), Some(plain.as_bytes()));
        }
    }

    #[test]
    fn all_bytes_round_trip() {
        let data: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        for len in 0..data.len() {
            assert_eq!(decode(&encode(&data[..len])).as_deref(), Some(&data[..len]));
        }
    }

    #[test]
    fn rejects_malformed() {
        for bad in ["Zg=", "Z===", "Zg==Zg==", "Zm9v!A==", "====", "Zm9"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }
}
