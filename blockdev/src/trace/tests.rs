use super::*;
use crate::oci::LayerId;

const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn layer(l: &str, ranges: &[[u64; 2]]) -> LayerTrace {
    LayerTrace {
        layer: LayerId::parse(l).unwrap(),
        diff_id: None,
        ranges: ranges.to_vec(),
        narrow: None,
    }
}

#[test]
fn round_trips_with_its_version() {
    let mut a = layer(A, &[[8192, 4096], [0, 4096]]);
    a.diff_id = Some(B.to_owned());
    let t = Trace::new([a, layer(B, &[]), layer(B, &[[4096, 8192]])]);
    assert_eq!(t.layers.len(), 2, "empty layers are left out");
    assert_eq!(
        t.layer(A).unwrap().ranges().collect::<Vec<_>>(),
        [8192..12288, 0..4096]
    );
    let bytes = t.encode();
    assert!(String::from_utf8_lossy(&bytes).contains("\"version\":2"));
    assert_eq!(Trace::decode(&bytes).unwrap(), t);
    assert_eq!(t.range_count(), 3);
}

#[test]
fn a_profile_recorded_twice_marks_its_narrow_reads() {
    let mut wide_a = layer(A, &[[0, 8192], [65536, 4096]]);
    wide_a.diff_id = Some(B.to_owned());
    let t = Trace::narrow_then_wide(
        Trace::new([layer(A, &[[4096, 4096]])]),
        Trace::new([layer(B, &[[0, 4096]]), wide_a]),
    );
    let layers: Vec<&str> = t.layers.iter().map(|l| l.layer.as_str()).collect();
    assert_eq!(layers, [A, B], "the narrow run's layers keep their place");
    let a = t.layer(A).unwrap();
    assert_eq!(
        a.ranges().collect::<Vec<_>>(),
        [4096..8192, 0..8192, 65536..69632],
        "the wide run's reads after the narrow run's"
    );
    assert_eq!((a.narrow, a.diff_id.as_deref()), (Some(1), Some(B)));
    assert_eq!(t.layer(B).unwrap().narrow, Some(0), "read only with more");
    assert_eq!(Trace::decode(&t.encode()).unwrap(), t);
    // Bounded like any trace; the mark stays within the ranges.
    let full: Vec<[u64; 2]> = (0..MAX_TRACE_RANGES as u64 + 1)
        .map(|i| [i * 4096, 4096])
        .collect();
    let t = Trace::narrow_then_wide(Trace::new([]), Trace::new([layer(A, &full)]));
    assert_eq!(t.range_count(), MAX_TRACE_RANGES);
    let t = Trace::narrow_then_wide(Trace::new([layer(A, &full)]), Trace::new([]));
    assert_eq!(t.layer(A).unwrap().narrow, Some(MAX_TRACE_RANGES));
    // A mark past the ranges is refused.
    let mut bad = layer(A, &[[0, 4096]]);
    bad.narrow = Some(2);
    let bytes = Trace {
        version: TRACE_VERSION,
        layers: vec![bad],
    }
    .encode();
    assert!(matches!(
        Trace::decode(&bytes),
        Err(TraceError::Malformed(m)) if m.contains("2 of its 1 ranges")
    ));
}

#[test]
fn new_is_bounded() {
    let many: Vec<[u64; 2]> = (0..MAX_TRACE_RANGES as u64 + 10)
        .map(|i| [i * 4096, 4096])
        .collect();
    let t = Trace::new([layer(A, &many), layer(B, &[[0, 1]])]);
    assert_eq!(t.range_count(), MAX_TRACE_RANGES);
    assert!(t.layer(B).is_none());
}

#[test]
fn refuses_bad_input() {
    assert!(matches!(
        Trace::decode(b"{not json"),
        Err(TraceError::Malformed(_))
    ));
    assert_eq!(
        Trace::decode(br#"{"version":1,"layers":[],"extra":1}"#),
        Err(TraceError::Version(1))
    );
    assert!(matches!(
        Trace::decode(br#"{"version":2,"layers":[],"extra":1}"#),
        Err(TraceError::Malformed(_))
    ));
    assert!(matches!(
        Trace::decode(br#"{"version":2,"layers":[{"layer":"../x","ranges":[[0,1]]}]}"#),
        Err(TraceError::Malformed(_))
    ));
    let bad_diff =
        format!(r#"{{"version":2,"layers":[{{"layer":"{A}","diff_id":"x","ranges":[]}}]}}"#);
    assert_eq!(
        Trace::decode(bad_diff.as_bytes()),
        Err(TraceError::BadDigest("x".into()))
    );
    for range in ["[5,0]", "[18446744073709551615,2]"] {
        let json = format!(r#"{{"version":2,"layers":[{{"layer":"{A}","ranges":[{range}]}}]}}"#);
        assert!(
            matches!(
                Trace::decode(json.as_bytes()),
                Err(TraceError::BadRange(..))
            ),
            "{range}"
        );
    }
    let big = vec![b' '; MAX_TRACE_BYTES + 1];
    assert_eq!(
        Trace::decode(&big),
        Err(TraceError::TooLarge(MAX_TRACE_BYTES + 1))
    );
    let ranges: Vec<String> = (0..=MAX_TRACE_RANGES).map(|c| format!("[{c},1]")).collect();
    let json = format!(
        r#"{{"version":2,"layers":[{{"layer":"{A}","ranges":[{}]}}]}}"#,
        ranges.join(",")
    );
    assert!(json.len() < MAX_TRACE_BYTES);
    assert_eq!(
        Trace::decode(json.as_bytes()),
        Err(TraceError::TooManyRanges(MAX_TRACE_RANGES + 1))
    );
}

#[test]
fn keys_depend_on_the_layer_order() {
    let k = trace_key(&[A, B]);
    assert!(valid_key(&k), "{k}");
    assert_ne!(k, trace_key(&[B, A]));
    assert_eq!(k, trace_key(&[A.to_owned(), B.to_owned()]));
    assert!(!valid_key("sha256-../../etc"));
    assert!(!valid_key(A));
}

#[test]
fn layers_are_named_by_identity() {
    // Unanchored (version 1) layers have an identity of their own.
    let unanchored = format!("unanchored:{A}");
    let t = Trace::new([layer(&unanchored, &[[0, 1]]), layer(B, &[[0, 2]])]);
    assert_eq!(Trace::decode(&t.encode()).unwrap(), t);
    let bad =
        format!(r#"{{"version":2,"layers":[{{"layer":"unanchored:{A}x","ranges":[[0,1]]}}]}}"#);
    assert!(matches!(
        Trace::decode(bad.as_bytes()),
        Err(TraceError::Malformed(_))
    ));
    assert_ne!(trace_key(&[&unanchored]), trace_key(&[A]));
}
