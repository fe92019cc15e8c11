//! `lazybd`: convert images to lazy layers, mount them lazily, inspect them.

mod check;
mod convert;
mod fd_holder;
mod image_ref;
mod image_source;
mod inspect;
mod layers;
mod mount;
mod mount_control;
mod mount_p2p;
mod pull;
mod record;
mod registry_args;
mod stats;
mod trace_file;
mod umount;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lazybd",
    version,
    about = "lazy block-device container image layers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Check(check::Args),
    Convert(convert::Args),
    FdHolder(fd_holder::Args),
    Inspect(inspect::Args),
    Layers(layers::Args),
    Mount(mount::Args),
    Pull(pull::Args),
    Umount(umount::Args),
    Stats(stats::Args),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Check(a) => check::run(a),
        Command::Convert(a) => convert::run(a),
        Command::FdHolder(a) => fd_holder::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Layers(a) => layers::run(a),
        Command::Mount(a) => mount::run(a),
        Command::Pull(a) => pull::run(a),
        Command::Umount(a) => umount::run(a),
        Command::Stats(a) => stats::run(a),
    }
}
