//! Startup traces come from the super node and from files: decoding any
//! bytes must not panic or blow up, and what decodes re-encodes to itself.
#![no_main]

use lazybd_blockdev::trace::{valid_key, Trace};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(trace) = Trace::decode(data) {
        let encoded = trace.encode();
        let again = Trace::decode(&encoded).expect("an encoded trace decodes");
        assert_eq!(again, trace, "decode(encode(t)) == t");
    }
    if let Ok(key) = std::str::from_utf8(data) {
        let _ = valid_key(key);
    }
});
