//! Runtime options containerd hands the shim (`start`'s stdin, Create):
//! runc's options message, CRI's runtimeoptions message and the runtime
//! config file's TOML. Any input must not panic.
//!
//! The first byte picks the parser; the rest is its input. (CRI options
//! name a file the shim then reads; that read is not fuzzed.)
#![no_main]

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use lazybd_shim::options::{decode_cri_config_path, parse_config, RuntimeOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let any = Any {
                type_url: "containerd.runc.v1.Options".into(),
                value: rest.to_vec(),
                ..Default::default()
            };
            let _ = RuntimeOptions::decode(Some(&any));
        }
        1 => {
            let _ = decode_cri_config_path(rest);
        }
        _ => {
            let _ = parse_config(&String::from_utf8_lossy(rest));
        }
    }
});
