//! `lazybd convert SRC DST`: convert an OCI image to lazybd layers.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lazybd_blockdev::convert::{
    self, ConvertOptions, ImageStore, LayerLimits, LayoutStore, RegistryStore,
};
use lazybd_blockdev::device::NodeConfig;

use crate::image_ref::ImageRef;

/// Convert an OCI image into one with lazybd layers (docs/convert.md).
///
/// SRC and DST are `oci:DIR[:TAG]` (an OCI image layout; DST is created if
/// missing, TAG defaults to latest) or a registry reference
/// `HOST[:PORT]/REPO[:TAG|@DIGEST]`.
#[derive(clap::Args)]
pub struct Args {
    src: String,
    dst: String,
    /// Largest chunk in bytes: a power of two from 4096 to 67108864.
    /// Chunks are cut where files begin and end, so smaller ones are common.
    #[arg(long, default_value_t = lazybd_blockdev::format::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// Startup profile: a startup trace file (docs/convert.md#startup-profiles;
    /// recorded by `lazybd mount --record-trace` or a node). The chunks it
    /// names are stored first in each layer, in the order they were read, and
    /// a node fetches them as one range when it attaches the layer.
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// Record the startup profile here: convert the image, run its
    /// entrypoint (Entrypoint + Cmd, Env, WorkingDir, User; runc, no
    /// network) until it exits or --record-secs pass, with 4 KiB of
    /// readahead and again with --record-read-ahead-kb, and convert it
    /// again with what it read stored first (as `ctr-remote image
    /// optimize`). Needs root and runc (docs/convert.md#recording-a-profile).
    #[arg(long, conflicts_with = "profile")]
    record_profile: bool,
    /// The most the nodes' lazy devices read ahead, KiB (their
    /// `lazy_read_ahead_kb`): the second recording's readahead, since a
    /// node that reads ahead further than its profile misses around every
    /// profiled read. Its reads are stored after the first recording's (4
    /// KiB), which is all a node on a slow link streams. 4 or less: one
    /// recording (docs/convert.md#recording-a-profile).
    #[arg(long, value_name = "KIB", requires = "record_profile",
          default_value_t = NodeConfig::LAZY_READ_AHEAD_KB,
          value_parser = clap::value_parser!(u32).range(0..=4096))]
    record_read_ahead_kb: u32,
    /// How long the recorded workload may run before it is stopped.
    #[arg(long, default_value_t = 10, value_name = "SECS", requires = "record_profile",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    record_secs: u64,
    /// Also write the recorded profile to FILE (for `--profile`, to inspect
    /// or to reuse).
    #[arg(long, value_name = "FILE", requires = "record_profile")]
    profile_out: Option<PathBuf>,
    /// Write the recorded workload's stdout and stderr to FILE.
    #[arg(long, value_name = "FILE", requires = "record_profile")]
    record_log: Option<PathBuf>,
    /// The runc that runs the recorded workload (a name is looked up on PATH).
    #[arg(
        long,
        default_value = "runc",
        value_name = "PATH",
        requires = "record_profile"
    )]
    runc: PathBuf,
    /// Scratch directory for unpacked layers and EROFS images.
    #[arg(long, default_value = "/var/tmp")]
    work_dir: PathBuf,
    /// Layers converted at the same time.
    #[arg(long, default_value_t = 2)]
    parallel: usize,
    /// Largest uncompressed layer (file data and tar stream), in bytes or
    /// with a K, M, G or T suffix (powers of 1024). A layer past it stops
    /// the conversion: --work-dir needs room for about twice this per
    /// layer converted at once.
    #[arg(long, value_name = "SIZE", default_value = "64G", value_parser = parse_size)]
    max_layer_size: u64,
    /// Most tar entries (files, directories, links, whiteouts) in one layer.
    #[arg(long, value_name = "N", default_value_t = LayerLimits::DEFAULT_MAX_ENTRIES)]
    max_layer_entries: u64,
    /// Platform to convert from a multi-platform image, OS/ARCH.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// Convert every platform of a multi-platform image and write an index
    /// of the converted manifests (instead of only --platform's manifest).
    #[arg(long, conflicts_with = "record_profile")]
    all_platforms: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    registry: crate::registry_args::RegistryArgs,
}

pub fn run(args: Args) -> Result<()> {
    let (os, arch) = args
        .platform
        .split_once('/')
        .context("--platform must be OS/ARCH, e.g. linux/amd64")?;
    if lazybd_blockdev::format::MIN_CHUNK_SIZE > args.chunk_size
        || args.chunk_size > lazybd_blockdev::format::MAX_CHUNK_SIZE
        || !args.chunk_size.is_power_of_two()
    {
        bail!(
            "--chunk-size {} is not a power of two from 4096 to 67108864",
            args.chunk_size
        );
    }
    let profile = match &args.profile {
        Some(path) => {
            let profile = convert::profile_of(&crate::trace_file::load(path)?);
            if profile.is_empty() {
                bail!(
                    "profile {}: no layer names its source diff_id",
                    path.display()
                );
            }
            profile
        }
        None => Default::default(),
    };
    let opts = ConvertOptions {
        chunk_size: args.chunk_size,
        profile,
        work_dir: args.work_dir.clone(),
        parallel: args.parallel,
        platform: (os.to_owned(), arch.to_owned()),
        all_platforms: args.all_platforms,
        limits: LayerLimits {
            max_bytes: args.max_layer_size,
            max_entries: args.max_layer_entries,
        },
    };
    let src =
        open(&args.src, false, &args.registry).with_context(|| format!("source {}", args.src))?;
    let dst = open(&args.dst, true, &args.registry)
        .with_context(|| format!("destination {}", args.dst))?;
    let out = if args.record_profile {
        let rec = crate::record::Recording {
            limit: std::time::Duration::from_secs(args.record_secs),
            runc: args.runc.clone(),
            profile_out: args.profile_out.clone(),
            log: args.record_log.clone(),
            read_ahead_kb: args.record_read_ahead_kb,
        };
        let src_is_local = matches!(ImageRef::parse(&args.src), ImageRef::Layout { .. });
        crate::record::convert_recorded(
            src.into(),
            src_is_local,
            dst.into(),
            &opts,
            &rec,
            &args.registry,
        )
    } else {
        convert::convert_image(src.as_ref(), dst.as_ref(), &opts).map_err(Into::into)
    }
    .with_context(|| format!("converting {} to {}", args.src, args.dst))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}", out.manifest_digest);
    }
    Ok(())
}

fn open(
    name: &str,
    create: bool,
    registry: &crate::registry_args::RegistryArgs,
) -> Result<Box<dyn ImageStore>> {
    Ok(match ImageRef::parse(name) {
        ImageRef::Layout { dir, tag } if create => Box::new(LayoutStore::create(&dir, tag)?),
        ImageRef::Layout { dir, tag } => Box::new(LayoutStore::open(&dir, tag)?),
        ImageRef::Registry(r) => Box::new(RegistryStore::new(&r, &registry.options())?),
    })
}

/// `123`, `64K`, `64G`, `1T` (powers of 1024; a trailing `B`/`iB` is
/// allowed). A dozen lines instead of a size-parsing crate for one flag.
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{text:?}: unknown unit {c:?} (K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 4096, 512M or 64G"))?;
    n.checked_mul(1 << shift)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?} is zero or too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64G"), Ok(64 << 30));
        assert_eq!(parse_size("64GiB"), Ok(64 << 30));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2KB"), Ok(2048));
        for bad in ["", "G", "0", "1X", "-1", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
