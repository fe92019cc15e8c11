//! Startup profiles (`lazybd convert --profile FILE`) are trace files a
//! user hands in, read as a trace and turned into per-diff_id ranges
//! (`convert::profile_of`): any bytes must not panic, every range the
//! converter is given is a non-empty one, and a narrow mark never counts
//! more ranges than there are.
#![no_main]

use lazybd_blockdev::convert::profile_of;
use lazybd_blockdev::trace::Trace;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(trace) = Trace::decode(data) else {
        return;
    };
    for profile in profile_of(&trace).values() {
        for r in &profile.ranges {
            assert!(r.start < r.end, "a profile range is not empty");
        }
        if let Some(narrow) = profile.narrow {
            assert!(narrow <= profile.ranges.len(), "the narrow mark is within");
        }
    }
});
