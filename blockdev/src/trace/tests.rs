use super::*;

const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

#[test]
fn round_trips_with_its_version() {
    let t = Trace::new([(A.to_owned(), vec![5, 1, 5, 3]), (B.to_owned(), vec![0])]);
    assert_eq!(t.chunks_of(A), [1, 3, 5]);
    let bytes = t.encode();
    assert!(String::from_utf8_lossy(&bytes).contains("\"version\":1"));
    assert_eq!(Trace::decode(&bytes).unwrap(), t);
}

#[test]
fn merge_dedups_and_keeps_layer_order() {
    let mut t = Trace::new([(B.to_owned(), vec![2]), (A.to_owned(), vec![1])]);
    t.merge(&Trace::new([
        (A.to_owned(), vec![1, 0]),
        (B.to_owned(), vec![2, 9]),
    ]));
    assert_eq!(t.layers[0].digest, B);
    assert_eq!(t.chunks_of(B), [2, 9]);
    assert_eq!(t.chunks_of(A), [0, 1]);
    assert_eq!(t.chunk_count(), 4);
    let empty = Trace::new([(A.to_owned(), vec![])]);
    assert!(empty.is_empty() && empty.layers.is_empty());
}

#[test]
fn merge_is_bounded() {
    let many: Vec<u64> = (0..MAX_TRACE_CHUNKS as u64 + 10).collect();
    let mut t = Trace::new([(A.to_owned(), many)]);
    assert_eq!(t.chunk_count(), MAX_TRACE_CHUNKS);
    t.merge(&Trace::new([(B.to_owned(), vec![1])]));
    assert_eq!(t.chunk_count(), MAX_TRACE_CHUNKS);
    assert!(t.chunks_of(B).is_empty());
}

#[test]
fn refuses_bad_input() {
    assert!(matches!(
        Trace::decode(b"{not json"),
        Err(TraceError::Malformed(_))
    ));
    assert_eq!(
        Trace::decode(br#"{"version":2,"layers":[],"extra":1}"#),
        Err(TraceError::Version(2))
    );
    assert!(matches!(
        Trace::decode(br#"{"version":1,"layers":[],"extra":1}"#),
        Err(TraceError::Malformed(_))
    ));
    assert_eq!(
        Trace::decode(br#"{"version":1,"layers":[{"digest":"../x","chunks":[1]}]}"#),
        Err(TraceError::BadDigest("../x".into()))
    );
    let big = vec![b' '; MAX_TRACE_BYTES + 1];
    assert_eq!(
        Trace::decode(&big),
        Err(TraceError::TooLarge(MAX_TRACE_BYTES + 1))
    );
    let chunks: Vec<String> = (0..=MAX_TRACE_CHUNKS).map(|c| c.to_string()).collect();
    let json = format!(
        r#"{{"version":1,"layers":[{{"digest":"{A}","chunks":[{}]}}]}}"#,
        chunks.join(",")
    );
    assert!(json.len() < MAX_TRACE_BYTES);
    assert_eq!(
        Trace::decode(json.as_bytes()),
        Err(TraceError::TooManyChunks(MAX_TRACE_CHUNKS + 1))
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
    let t = Trace::new([(unanchored.clone(), vec![1]), (B.to_owned(), vec![2])]);
    assert_eq!(Trace::decode(&t.encode()).unwrap(), t);
    let bad = format!(r#"{{"version":1,"layers":[{{"digest":"unanchored:{A}x","chunks":[1]}}]}}"#);
    assert!(matches!(
        Trace::decode(bad.as_bytes()),
        Err(TraceError::BadDigest(_))
    ));
    assert_ne!(trace_key(&[&unanchored]), trace_key(&[A]));
}
