//! Randomness and hashing for secrets: API token secrets and the local
//! cluster's password. Secrets come from the OS CSPRNG; only SHA-256 digests
//! of token secrets are ever stored.

use sha2::{Digest, Sha256};

/// `n` random bytes from the OS CSPRNG, hex-encoded.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("the OS random number generator is available");
    hex(&bytes)
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn hex(bytes: &[u8]) -> String {
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

/// A freshly generated API token: `tny_<display prefix>_<secret>`. The
/// display prefix (8 hex chars, not secret) identifies the token in listings;
/// the secret part carries 256 random bits.
pub struct NewToken {
    pub plaintext: String,
    pub display_prefix: String,
    pub hash: [u8; 32],
}

impl NewToken {
    pub fn generate() -> Self {
        let display_prefix = random_hex(4);
        let plaintext = format!("{TOKEN_PREFIX}_{display_prefix}_{}", random_hex(32));
        let hash = sha256(plaintext.as_bytes());
        NewToken {
            plaintext,
            display_prefix,
            hash,
        }
    }
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
        let a = NewToken::generate();
        let b = NewToken::generate();
        assert_ne!(a.plaintext, b.plaintext);
        assert_eq!(a.plaintext.len(), 3 + 1 + 8 + 1 + 64);
        assert!(a
            .plaintext
            .starts_with(&format!("tny_{}_", a.display_prefix)));
        assert_eq!(token_hash(&a.plaintext), a.hash);
        assert_ne!(token_hash(&b.plaintext), a.hash);
    }
}
