//! Layer tars are untrusted: unpacking any bytes must not panic, blow up,
//! or write anything outside the directory it unpacks into (a canary
//! directory beside it must stay empty).
#![no_main]

use lazybd_blockdev::convert::unpack::{unpack_layer, LayerLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let (root, canary) = (tmp.path().join("root"), tmp.path().join("canary"));
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&canary).unwrap();
    let limits = LayerLimits {
        max_bytes: 1 << 20,
        max_entries: 1000,
    };
    let _ = unpack_layer(data, &root, &limits);
    assert!(
        std::fs::read_dir(&canary).unwrap().next().is_none(),
        "the layer wrote outside its root"
    );
});
