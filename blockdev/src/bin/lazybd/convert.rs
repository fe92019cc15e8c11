//! `lazybd convert SRC DST`: convert an OCI image to lazybd layers.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lazybd_blockdev::convert::{self, ConvertOptions, ImageStore, LayoutStore, RegistryStore};

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
    /// Scratch directory for unpacked layers and EROFS images.
    #[arg(long, default_value = "/var/tmp")]
    work_dir: PathBuf,
    /// Layers converted at the same time.
    #[arg(long, default_value_t = 2)]
    parallel: usize,
    /// Platform to convert from a multi-platform image, OS/ARCH.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
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
    };
    let src =
        open(&args.src, false, &args.registry).with_context(|| format!("source {}", args.src))?;
    let dst = open(&args.dst, true, &args.registry)
        .with_context(|| format!("destination {}", args.dst))?;
    let out = convert::convert_image(src.as_ref(), dst.as_ref(), &opts)
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
