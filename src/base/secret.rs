//! Randomness and hashing for secrets: API token secrets and the local
//! cluster's password. Secrets come from the OS CSPRNG; only SHA-256 digests
//! of token secrets are ever stored.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// `n` random bytes from the OS CSPRNG.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("the OS random number generator is available");
    bytes
}

/// `n` random bytes from the OS CSPRNG, hex-encoded.
pub fn random_hex(n: usize) -> String {
    hex(&random_bytes(n))
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Prefix of every API token, so leaked tokens are recognisable by scanners.
pub const TOKEN_PREFIX: &str = "tny";

/// Hex digits of a token's MAC, at the end of its secret part.
const MAC_HEX: usize = 8;
/// Hex digits of a token's secret part (random digits, then the MAC).
pub const SECRET_HEX: usize = 64;

/// A freshly generated API token: `tny_<display prefix>_<secret>`. The
/// display prefix (8 hex chars, not secret) identifies the token in listings;
/// the secret part is 224 random bits followed by a 32-bit MAC of everything
/// before it under the installation's token key (format 2), so a server can
/// refuse a made-up token without a database lookup.
pub struct NewToken {
    pub plaintext: String,
    pub display_prefix: String,
    pub hash: [u8; 32],
}

impl NewToken {
    pub fn generate(key: &[u8]) -> Self {
        let display_prefix = random_hex(4);
        let unsigned = format!(
            "{TOKEN_PREFIX}_{display_prefix}_{}",
            random_hex((SECRET_HEX - MAC_HEX) / 2)
        );
        let plaintext = format!("{unsigned}{}", mac_hex(key, &unsigned));
        let hash = sha256(plaintext.as_bytes());
        NewToken {
            plaintext,
            display_prefix,
            hash,
        }
    }
}

fn mac_hex(key: &[u8], unsigned: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any size");
    mac.update(unsigned.as_bytes());
    hex(&mac.finalize().into_bytes()[..MAC_HEX / 2])
}

/// True when a well-formed token carries a valid format-2 MAC under `key`.
/// A made-up token passes with probability 2^-32. Tokens issued before
/// format 2 do not pass (their owners' display prefixes are known, see
/// `auth`).
pub fn mac_matches(key: &[u8], token: &str) -> bool {
    if token.len() < MAC_HEX || !token.is_ascii() {
        return false;
    }
    let (unsigned, mac) = token.split_at(token.len() - MAC_HEX);
    // Not secret: a mismatch only means "look no further", and the digest
    // lookup that follows a match is what authenticates.
    mac_hex(key, unsigned) == mac
}

/// The digest under which a presented token is looked up.
pub fn token_hash(presented: &str) -> [u8; 32] {
    sha256(presented.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_and_hash_matches() {
        let key = [7u8; 32];
        let a = NewToken::generate(&key);
        let b = NewToken::generate(&key);
        assert_ne!(a.plaintext, b.plaintext);
        assert_eq!(a.plaintext.len(), 3 + 1 + 8 + 1 + 64);
        assert!(a
            .plaintext
            .starts_with(&format!("tny_{}_", a.display_prefix)));
        assert_eq!(token_hash(&a.plaintext), a.hash);
        assert_ne!(token_hash(&b.plaintext), a.hash);
    }

    #[test]
    fn the_mac_tells_issued_tokens_from_made_up_ones() {
        let key = [7u8; 32];
        let t = NewToken::generate(&key).plaintext;
        assert!(mac_matches(&key, &t));
        // another installation's key, one changed digit, a made-up token
        assert!(!mac_matches(&[8u8; 32], &t));
        let mut tampered = t.clone().into_bytes();
        tampered[20] = if tampered[20] == b'0' { b'1' } else { b'0' };
        assert!(!mac_matches(&key, std::str::from_utf8(&tampered).unwrap()));
        let made_up = format!("tny_{}_{}", random_hex(4), random_hex(32));
        assert!(!mac_matches(&key, &made_up));
        assert!(!mac_matches(&key, "ü"));
    }
}
