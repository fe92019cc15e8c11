//! Startup traces (version 2) come from the super node, from peers and from
//! files: decoding any bytes must not panic or blow up, what decodes
//! re-encodes to itself, and its ranges neither are empty nor overflow.
#![no_main]

use lazybd_blockdev::trace::{valid_key, Trace, MAX_TRACE_LAYERS, MAX_TRACE_RANGES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(trace) = Trace::decode(data) {
        assert!(trace.layers.len() <= MAX_TRACE_LAYERS);
        assert!(trace.range_count() <= MAX_TRACE_RANGES);
        for l in &trace.layers {
            for &[o, n] in &l.ranges {
                assert!(n > 0 && o.checked_add(n).is_some(), "a checked range");
            }
        }
        let again = Trace::decode(&trace.encode()).expect("an encoded trace decodes");
        assert_eq!(again, trace, "decode(encode(t)) == t");
    }
    if let Ok(key) = std::str::from_utf8(data) {
        let _ = valid_key(key);
    }
});
