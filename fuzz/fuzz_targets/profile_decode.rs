//! Startup profiles (`lazybd convert --profile`) are files a user hands in:
//! decoding any bytes must not panic, and what decodes is usable.
#![no_main]

use lazybd_blockdev::convert::profile::Profile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(profile) = Profile::decode(data) {
        for ranges in profile.by_diff_id().values() {
            for r in ranges {
                assert!(r.start < r.end, "a decoded range is not empty");
            }
        }
        Profile::decode(&profile.encode()).expect("an encoded profile decodes");
    }
});
