//! The `eni` CNI plugin binary: CNI_* environment and stdin in, a result or
//! error object on stdout (see docs/cni-eni.md).

use std::io::{Read, Write};
use std::process::ExitCode;

use lazybd_eni::env::Env;
use lazybd_eni::error::CniError;
use lazybd_eni::{log, run};

/// A network config is a few KiB; refuse to buffer unbounded input.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

const USAGE: &str = "\
eni: CNI plugin that moves a host NIC (ENI), chosen by MAC address, into a pod
network namespace as CNI_IFNAME and brings it back on DEL under the name
eni<12 hex digits of its MAC>, which no other NIC can hold.

It is run by a container runtime, not by hand: set CNI_COMMAND (ADD, DEL,
CHECK, STATUS, GC, VERSION), CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_PATH
and pass the network config on stdin. Spec versions: 0.4.0, 1.0.0, 1.1.0.
The ENI's MAC comes from runtimeConfig.eniMac, the pod annotation
lazybd.io/eni-mac (only with allowPodAnnotation), ENI_MAC in CNI_ARGS, or mac
in the config. Only NICs the operator offered are taken: mac/allowedMacs in
the config, or a file <stateDir>/available/<12 hex digits of the MAC>; a NIC
with the host's addresses or routes is never taken. See docs/cni-eni.md.
";

fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let env = Env::from_process();
    if env.is_err() && std::env::var_os("CNI_COMMAND").is_none() {
        eprint!("{USAGE}");
    }
    let mut stdin = Vec::new();
    let read = std::io::stdin()
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut stdin);
    let env = match read {
        Ok(n) if n as u64 > MAX_CONFIG_BYTES => Err(CniError::InvalidConfig(format!(
            "network config on stdin exceeds {MAX_CONFIG_BYTES} bytes"
        ))),
        Ok(_) => env,
        Err(e) => Err(CniError::io("read network config from stdin", e)),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let outcome = match runtime {
        Ok(rt) => rt.block_on(run(env, &stdin)),
        Err(e) => lazybd_eni::Outcome {
            result: Err(CniError::io("start the async runtime", e)),
            version: "1.1.0".into(),
        },
    };
    let mut out = std::io::stdout().lock();
    match outcome.result {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            log(format!("error {}: {e}", e.code()));
            let _ = writeln!(out, "{}", e.to_json(&outcome.version));
            ExitCode::FAILURE
        }
    }
}
