//! Token secrets: how they are made, read from a request and hashed.
//!
//! A secret is `sl_` followed by 43 base64url characters (32 random bytes).
//! Only its SHA-256 is ever kept; [`TokenSecret`] redacts itself in `Debug`
//! so a stray `{:?}` cannot leak one.

use std::fmt;
use std::hash::{Hash, Hasher};

use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};

/// Longest credential we hash. Longer ones cannot be a token of ours or a
/// sane admin token, and are refused before any work is done.
pub const MAX_PRESENTED_LEN: usize = 512;

/// A freshly issued secret. It is shown once, in the creation response.
pub struct TokenSecret(String);

impl TokenSecret {
    /// Draws 32 bytes from the system CSPRNG.
    pub fn generate(rng: &SystemRandom) -> Result<TokenSecret, ring::error::Unspecified> {
        let mut raw = [0u8; 32];
        rng.fill(&mut raw)?;
        let mut s = String::with_capacity(46);
        s.push_str("sl_");
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(raw, &mut s);
        Ok(TokenSecret(s))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash::of(self.0.as_bytes())
    }
}

impl fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenSecret(<redacted>)")
    }
}

/// SHA-256 of a secret: the only form in which secrets are stored or looked up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    pub fn of(secret: &[u8]) -> TokenHash {
        let d = ring::digest::digest(&ring::digest::SHA256, secret);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        TokenHash(out)
    }

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[(b >> 4) as usize]));
            s.push(char::from(HEX[(b & 15) as usize]));
        }
        s
    }

    pub fn from_hex(s: &str) -> Option<TokenHash> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(TokenHash(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl Hash for TokenHash {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The bytes are already a uniform SHA-256; eight of them are a
        // perfectly good hash. Entries are only inserted by admins minting
        // random secrets, so an attacker cannot crowd a bucket.
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", &self.to_hex()[..12])
    }
}

/// Extracts the credential from an `Authorization: Bearer <token>` header
/// value. Returns `None` for anything that cannot be a credential of ours,
/// without hashing it.
pub fn parse_bearer(header: &[u8]) -> Option<&[u8]> {
    let rest = header
        .strip_prefix(b"Bearer ")
        .or_else(|| header.strip_prefix(b"bearer "))?;
    let tok = rest.trim_ascii();
    plausible_credential(tok).then_some(tok)
}

/// A credential is 1–512 visible ASCII characters (an MQTT password or the
/// text after `Bearer `).
pub fn plausible_credential(tok: &[u8]) -> bool {
    !tok.is_empty()
        && tok.len() <= MAX_PRESENTED_LEN
        && tok.iter().all(|c| (0x21..=0x7e).contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_have_the_contract_shape() {
        let rng = SystemRandom::new();
        let a = TokenSecret::generate(&rng).unwrap();
        let b = TokenSecret::generate(&rng).unwrap();
        assert_eq!(a.expose().len(), 46);
        assert!(a.expose().starts_with("sl_"));
        assert!(a.expose()[3..]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_ne!(a.expose(), b.expose());
        assert!(!format!("{a:?}").contains(&a.expose()[3..]));
    }

    #[test]
    fn hash_roundtrips_through_hex() {
        let h = TokenHash::of(b"sl_abc");
        assert_eq!(TokenHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(TokenHash::from_hex("zz"), None);
        // Known SHA-256 of "abc".
        assert_eq!(
            TokenHash::of(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(parse_bearer(b"Bearer sl_x"), Some(&b"sl_x"[..]));
        assert_eq!(parse_bearer(b"bearer  sl_x "), Some(&b"sl_x"[..]));
        assert_eq!(parse_bearer(b"Basic abc"), None);
        assert_eq!(parse_bearer(b"Bearer "), None);
        assert_eq!(parse_bearer(b"Bearer a b"), None);
        assert_eq!(parse_bearer(b"Bearer \xff"), None);
        let long = [b'a'; 600];
        let mut h = b"Bearer ".to_vec();
        h.extend_from_slice(&long);
        assert_eq!(parse_bearer(&h), None);
    }
}
