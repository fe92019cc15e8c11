//! The CNI environment (`CNI_COMMAND`, `CNI_ARGS`, ...: the runtime's, with
//! `CNI_ARGS` carrying pod-chosen values) and MAC addresses: any input must
//! not panic, and what parses is checked.
//!
//! Input: NUL-separated values of CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS,
//! CNI_IFNAME, CNI_ARGS, CNI_PATH.
#![no_main]

use lazybd_eni::env::Env;
use lazybd_eni::mac::Mac;
use libfuzzer_sys::fuzz_target;

const VARS: [&str; 6] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let values: Vec<&str> = text.split('\0').collect();
    let env = Env::from_vars(|k| {
        let i = VARS.iter().position(|v| *v == k)?;
        values.get(i).map(|v| (*v).to_owned())
    });
    if let Ok(env) = env {
        assert!(env.ifname.len() <= 15);
        assert!(!env.container_id.contains('/') && !env.ifname.contains('/'));
        let _ = env.args_string();
        if let Some(mac) = env.arg("ENI_MAC") {
            let _ = mac.parse::<Mac>();
        }
    }
    for v in &values {
        if let Ok(mac) = v.parse::<Mac>() {
            assert_eq!(mac.to_string().parse::<Mac>().ok(), Some(mac), "round trip");
        }
    }
});
