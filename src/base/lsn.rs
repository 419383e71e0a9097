//! A position in PostgreSQL's write-ahead log (an LSN), as PostgreSQL
//! writes it (`16/B374D848`: the high and low 32 bits in hex). Reads from
//! replicas compare these: a replica that has replayed up to a position has
//! every transaction committed before it. Clients send positions back
//! (`Tenantry-Position`), so parsing is strict and bounded.

use std::fmt;

/// A WAL position; `Lsn(0)` is before anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a WAL position is two hexadecimal numbers of at most 8 digits each, as in 16/B374D848")]
pub struct LsnError;

impl Lsn {
    /// `HIGH/LOW`, each 1 to 8 hex digits.
    pub fn parse(text: &str) -> Result<Lsn, LsnError> {
        let (high, low) = text.split_once('/').ok_or(LsnError)?;
        let half = |part: &str| {
            let hex =
                !part.is_empty() && part.len() <= 8 && part.bytes().all(|b| b.is_ascii_hexdigit());
            if hex {
                u32::from_str_radix(part, 16).map_err(|_| LsnError)
            } else {
                Err(LsnError)
            }
        };
        Ok(Lsn(((half(high)? as u64) << 32) | half(low)? as u64))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_postgresql_writes_and_writes_it_back() {
        for text in ["0/0", "16/B374D848", "FFFFFFFF/FFFFFFFF", "0/1"] {
            assert_eq!(Lsn::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(Lsn::parse("1/0").unwrap(), Lsn(1 << 32));
        assert_eq!(Lsn::parse("a/b").unwrap(), Lsn((10 << 32) | 11));
        assert!(Lsn::parse("1/0").unwrap() > Lsn::parse("0/FFFFFFFF").unwrap());
    }

    #[test]
    fn refuses_anything_else() {
        for text in [
            "",
            "/",
            "0/",
            "/0",
            "0",
            "0/0/0",
            "g/0",
            "-1/0",
            "+1/0",
            " 0/0",
            "0/0 ",
            "100000000/0",
            "0/100000000",
            "0x1/0",
        ] {
            assert_eq!(Lsn::parse(text), Err(LsnError), "{text:?}");
        }
    }
}
