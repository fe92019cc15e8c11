//! Startup profiles: what a container read of each layer during its first
//! seconds, as image byte ranges in the order it first read them. `lazybd
//! convert --profile` stores those chunks first in each blob, so a node
//! streams them in one range before the container asks.
//!
//! ```json
//! {"version": 1, "layers": [{"diff_id": "sha256:…", "ranges": [[0, 4096], [81920, 12288]]}]}
//! ```
//!
//! Layers are named by the *source* layer's diff_id: the EROFS image of a
//! source layer is the same in every conversion, so a profile recorded
//! against one conversion (`lazybd convert --record-profile`, or a node's
//! startup trace) applies to the next. Files may come from elsewhere, so
//! sizes are bounded and every range is checked against its image later.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::oci::digest_hex;

pub const PROFILE_VERSION: u32 = 1;
/// Largest profile file read.
pub const MAX_PROFILE_BYTES: u64 = 16 << 20;
/// Ranges in one profile, over all layers.
pub const MAX_PROFILE_RANGES: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum ProfileError {
    #[error("startup profile {path}: {reason}")]
    Invalid { path: String, reason: String },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub version: u32,
    pub layers: Vec<LayerProfile>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerProfile {
    /// The source layer's diff_id.
    pub diff_id: String,
    /// `[offset, length]` of each range, in first-read order.
    pub ranges: Vec<[u64; 2]>,
}

impl Profile {
    pub fn new(layers: Vec<LayerProfile>) -> Self {
        Profile {
            version: PROFILE_VERSION,
            layers,
        }
    }

    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let invalid = |reason: String| ProfileError::Invalid {
            path: path.display().to_string(),
            reason,
        };
        let len = std::fs::metadata(path)
            .map_err(|e| invalid(e.to_string()))?
            .len();
        if len > MAX_PROFILE_BYTES {
            return Err(invalid(format!(
                "{len} bytes, more than {MAX_PROFILE_BYTES}"
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| invalid(e.to_string()))?;
        Self::decode(&bytes).map_err(invalid)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let p: Profile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if p.version != PROFILE_VERSION {
            return Err(format!(
                "version {} (this build reads {PROFILE_VERSION})",
                p.version
            ));
        }
        let total: usize = p.layers.iter().map(|l| l.ranges.len()).sum();
        if total > MAX_PROFILE_RANGES {
            return Err(format!("{total} ranges, more than {MAX_PROFILE_RANGES}"));
        }
        let mut seen = std::collections::HashSet::new();
        for l in &p.layers {
            digest_hex(&l.diff_id).map_err(|e| e.to_string())?;
            if !seen.insert(&l.diff_id) {
                return Err(format!("layer {} is listed twice", l.diff_id));
            }
            if let Some([o, n]) = l
                .ranges
                .iter()
                .find(|[o, n]| *n == 0 || o.checked_add(*n).is_none())
            {
                return Err(format!("layer {}: bad range [{o}, {n}]", l.diff_id));
            }
        }
        Ok(p)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain data serialises")
    }

    /// Per source diff_id, the ranges in first-read order.
    pub fn by_diff_id(&self) -> HashMap<String, Vec<Range<u64>>> {
        self.layers
            .iter()
            .map(|l| {
                let ranges = l.ranges.iter().map(|&[o, n]| o..o + n).collect();
                (l.diff_id.clone(), ranges)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn round_trips_and_refuses_bad_input() {
        let p = Profile::new(vec![LayerProfile {
            diff_id: d('a'),
            ranges: vec![[4096, 8192], [0, 4096]],
        }]);
        let back = Profile::decode(&p.encode()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.by_diff_id()[&d('a')], [4096..12288, 0..4096]);
        for bad in [
            r#"{"version": 9, "layers": []}"#.to_owned(),
            r#"{"version": 1, "layers": [], "extra": 1}"#.to_owned(),
            format!(
                r#"{{"version": 1, "layers": [{{"diff_id": "{}", "ranges": [[5, 0]]}}]}}"#,
                d('a')
            ),
            format!(
                r#"{{"version": 1, "layers": [{{"diff_id": "{}", "ranges": [[18446744073709551615, 2]]}}]}}"#,
                d('a')
            ),
            r#"{"version": 1, "layers": [{"diff_id": "../../etc", "ranges": []}]}"#.to_owned(),
            format!(
                r#"{{"version": 1, "layers": [{{"diff_id": "{0}", "ranges": []}}, {{"diff_id": "{0}", "ranges": []}}]}}"#,
                d('b')
            ),
        ] {
            assert!(Profile::decode(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
