//! The network config a CNI runtime pipes to `eni` (stdin; written by the
//! operator, but its runtimeConfig and pod annotations by others): any
//! bytes must not panic.
#![no_main]

use lazybd_eni::config::NetConf;
use lazybd_eni::env::Env;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(conf) = NetConf::parse(data) else {
        return;
    };
    let env = Env::from_vars(|k| {
        match k {
            "CNI_COMMAND" => Some("ADD"),
            "CNI_CONTAINERID" => Some("c"),
            "CNI_NETNS" => Some("/var/run/netns/x"),
            "CNI_IFNAME" => Some("eth0"),
            "CNI_ARGS" => Some("ENI_MAC=02:00:00:00:00:01"),
            _ => None,
        }
        .map(str::to_owned)
    })
    .expect("a valid environment");
    if let Ok(Some(mac)) = conf.eni_mac(&env) {
        let _ = conf.offers(mac);
    }
});
