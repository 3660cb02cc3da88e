//! WireGuard keys: Curve25519 private and public keys, with the two text forms in use
//! (base64 for `wg` and config files, lowercase hex for the UAPI socket).
//!
//! A [`PrivateKey`] never prints itself: `Debug` shows only its public half, and there is no
//! `Display`. The bytes are zeroed when the key is dropped.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519;

/// Why a key text was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Not 44 characters of base64 or 64 hex digits decoding to 32 bytes.
    #[error("a WireGuard key is 32 bytes as base64 (44 characters) or hex (64 digits)")]
    Malformed,
}

/// A node's long-term private key.
#[derive(Clone)]
pub struct PrivateKey(x25519::StaticSecret);

impl PrivateKey {
    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Self {
        Self(x25519::StaticSecret::random_from_rng(rand_core::OsRng))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(x25519::StaticSecret::from(bytes))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.0).to_bytes())
    }

    /// The raw bytes, for storing the key (0600) or writing it to `wg`.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The base64 form `wg` reads from a key file.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.to_bytes())
    }

    pub(crate) fn secret(&self) -> &x25519::StaticSecret {
        &self.0
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public_key())
    }
}

/// Keys are equal when their public halves are (no secret-dependent comparison).
impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        self.public_key() == other.public_key()
    }
}

impl Eq for PrivateKey {}

impl FromStr for PrivateKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        parse_key(s).map(Self::from_bytes)
    }
}

/// A peer's public key; `Display`/`FromStr` use base64, as `wg` does.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        parse_key(s).map(Self)
    }
}

/// Parse 32 bytes given as base64 or as 64 hex digits.
pub(crate) fn parse_key(s: &str) -> Result<[u8; 32], KeyError> {
    let s = s.trim();
    if s.len() == 64 {
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or(KeyError::Malformed)?, 16)
                .map_err(|_| KeyError::Malformed)?;
        }
        return Ok(out);
    }
    let bytes = STANDARD.decode(s).map_err(|_| KeyError::Malformed)?;
    bytes.try_into().map_err(|_| KeyError::Malformed)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_hex_round_trip() {
        let key = PrivateKey::generate();
        let public = key.public_key();
        assert_eq!(public.to_string().parse::<PublicKey>(), Ok(public));
        assert_eq!(public.to_hex().parse::<PublicKey>(), Ok(public));
        let again: PrivateKey = key.to_base64().parse().expect("own base64 parses");
        assert_eq!(again.public_key(), public);
        assert_eq!(parse_key("abc"), Err(KeyError::Malformed));
        assert_eq!(parse_key(&"zz".repeat(32)), Err(KeyError::Malformed));
    }

    #[test]
    fn debug_never_shows_the_private_key() {
        let key = PrivateKey::from_bytes([7; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains(&key.to_base64()));
        assert!(!shown.contains(&hex(&key.to_bytes())));
        assert!(shown.contains(&key.public_key().to_string()));
    }
}
