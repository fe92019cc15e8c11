//! The ENI's identity: its MAC address, and the host-side name derived from it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Ethernet MAC address. The plugin never identifies an ENI by its name
/// (names are per netns and the kernel reuses them), only by this.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac([u8; 6]);

#[derive(Debug, thiserror::Error)]
#[error("invalid ENI MAC address {0:?}: want a unicast, non-zero address like 02:00:00:aa:bb:cc")]
pub struct InvalidMac(pub String);

impl Mac {
    pub fn from_bytes(bytes: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(bytes).ok().map(Mac)
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// Twelve lowercase hex digits, used for file names.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The name the ENI carries whenever it is in the host netns after a DEL:
    /// `eni` + all twelve hex digits = 15 bytes, the most IFNAMSIZ allows.
    /// It is unique per MAC, so it cannot be held by another NIC (unlike the
    /// `ethN` name udev or the kernel gave it, which is reused as soon as it
    /// is free), and it does not look like a kernel template name.
    pub fn parking_name(&self) -> String {
        format!("eni{}", self.hex())
    }
}

impl FromStr for Mac {
    type Err = InvalidMac;

    fn from_str(s: &str) -> Result<Mac, InvalidMac> {
        let bad = || InvalidMac(s.to_string());
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut out = [0u8; 6];
        for (o, p) in out.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        // All-zero would match loopback; a multicast bit no NIC's own address.
        if out == [0; 6] || out[0] & 1 == 1 {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_separators_and_any_case() {
        let a: Mac = "02:AB:cd:00:11:ff".parse().unwrap();
        let b: Mac = "02-ab-CD-00-11-FF".parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "02:ab:cd:00:11:ff");
    }

    #[test]
    fn rejects_malformed() {
        for s in [
            "",
            "02:ab:cd:00:11",
            "02:ab:cd:00:11:ff:00",
            "2:ab:cd:00:11:ff",
            "00:00:00:00:00:00",
            "01:00:5e:00:00:01",
            "zz:ab:cd:00:11:ff",
        ] {
            assert!(s.parse::<Mac>().is_err(), "{s} accepted");
        }
    }

    #[test]
    fn parking_name_fits_ifnamsiz_and_is_unique_per_mac() {
        let a: Mac = "02:00:00:00:00:01".parse().unwrap();
        let b: Mac = "02:00:00:00:00:10".parse().unwrap();
        assert_eq!(a.parking_name(), "eni020000000001");
        assert_eq!(a.parking_name().len(), 15);
        assert_ne!(a.parking_name(), b.parking_name());
    }
}
