//! `lazybd pull REF`: pull an image into containerd through its own API so
//! that lazybd layers are attached lazily by lazybd-snapshotter (the
//! analogue of stargz's `ctr-remote rpull`; `ctr image pull` does not label
//! the snapshotter's Prepare calls with the image, so it cannot).
//!
//! Manifest and config go into containerd's content store. Each layer is
//! prepared through the snapshotter as the snapshot its chain ID names, with
//! the labels CRI uses and, as containerd's unpacker does, the layer
//! descriptor's `containerd.io/snapshot/` annotations (the lazybd ones: where
//! the index is and the layer's anchor), which the lazybd snapshotter answers
//! with AlreadyExists (attached lazily, without fetching the manifest again).
//! A lazybd layer's diff_id is on its descriptor (its anchor), so for an
//! image of lazybd layers the Prepares start while the config is fetched,
//! and the config must then name the same snapshots. A layer the snapshotter
//! does not take (an ordinary image) is downloaded, applied with containerd's
//! diff service and committed, as `ctr image pull` would.
//! Then the image record points at the manifest, and `ctr run --snapshotter
//! lazybd REF ...` finds every layer unpacked.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    content_client::ContentClient, diff_client::DiffClient, images_client::ImagesClient,
    leases_client::LeasesClient, ApplyRequest, CreateImageRequest, DeleteRequest, Image,
    UpdateImageRequest, WriteAction, WriteContentRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request};
use containerd_client::types::{Descriptor, Mount};
use futures_util::StreamExt;
use lazybd_blockdev::oci::{
    self, config_diff_ids, is_manifest_list, pick_platform, LazyLayerAnnotations,
    MEDIA_LAZYBD_LAYER,
};
use lazybd_blockdev::registry::RegistryClient;
use oci_spec::image::{ImageIndex, ImageManifest};
use tokio::io::AsyncReadExt;

use crate::registry_args::RegistryArgs;

/// Pull an image into containerd, lazily for lazybd layers.
#[derive(clap::Args)]
pub struct Args {
    /// Registry reference `HOST[:PORT]/REPO[:TAG|@DIGEST]`; also the image name.
    reference: String,
    /// containerd's gRPC socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    address: PathBuf,
    /// containerd namespace.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// The snapshotter to prepare layers with (containerd's proxy plugin name).
    #[arg(long, default_value = "lazybd")]
    snapshotter: String,
    /// Platform to pull from a multi-platform image, OS/ARCH.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub fn run(args: Args) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(pull(args))
}

/// Snapshot Stats asked of containerd at once.
const STATS_AT_ONCE: usize = 16;

/// What containerd keeps for the image: bytes and media type of each
/// manifest document, top first.
struct Documents {
    top: (Vec<u8>, String, String),
    manifest: ImageManifest,
    manifest_bytes: Vec<u8>,
    manifest_digest: String,
}

async fn pull(args: Args) -> Result<()> {
    // The registry's answers and containerd's lease do not depend on each
    // other: both are asked for at once (a cold start waits for this).
    let from_registry = async {
        let registry = RegistryClient::new(&args.reference, &args.registry.options())?;
        let docs = fetch_manifest(&registry, &args.platform).await?;
        anyhow::Ok((registry, docs))
    };
    let to_containerd = async {
        let channel = containerd_client::connect(&args.address)
            .await
            .with_context(|| format!("connecting to containerd at {}", args.address.display()))?;
        let ctd = Containerd {
            channel,
            namespace: args.namespace.clone(),
            lease: format!("lazybd-pull-{}", nanos()),
        };
        ctd.create_lease().await?;
        anyhow::Ok(ctd)
    };
    let (fetched, ctd) = tokio::join!(from_registry, to_containerd);
    let ctd = ctd?;
    let result = async {
        let (registry, docs) = fetched?;
        let config = fetch_config(&registry, &docs.manifest);
        let counts = match lazy_chain_ids(&docs.manifest) {
            // Every layer's diff_id is on its descriptor, so the layers are
            // prepared while the config is on its way (a cold start waits
            // for this); the config must then name the same. Both are
            // awaited to the end: a Prepare is never cut off halfway.
            Some(chains) => {
                let documents = async {
                    let config = config.await?;
                    same_chains(&config.chains, &chains)?;
                    ctd.write_documents(&docs, &config, &args.snapshotter).await
                };
                let (documents, counts) = tokio::join!(
                    documents,
                    ctd.prepare_layers(&args, &docs, &registry, &chains)
                );
                documents?;
                counts?
            }
            None => {
                let config = config.await?;
                let ((), counts) = tokio::try_join!(
                    ctd.write_documents(&docs, &config, &args.snapshotter),
                    ctd.prepare_layers(&args, &docs, &registry, &config.chains)
                )?;
                counts
            }
        };
        ctd.put_image(&args.reference, &docs.top).await?;
        anyhow::Ok((docs.manifest.layers().len(), counts))
    }
    .await;
    if let Err(e) = ctd.delete_lease().await {
        eprintln!("warning: deleting lease {}: {e:#}", ctd.lease);
    }
    let (layers, [already, lazy, unpacked]) = result?;
    println!(
        "{}: {layers} layers: {lazy} attached lazily by {}, {unpacked} unpacked, {already} already present",
        args.reference, args.snapshotter,
    );
    Ok(())
}

/// The image config and the chain IDs its diff_ids give.
struct Config {
    bytes: Vec<u8>,
    chains: Vec<String>,
}

async fn fetch_config(registry: &RegistryClient, manifest: &ImageManifest) -> Result<Config> {
    let bytes = registry.blob(manifest.config().digest().as_ref()).await?;
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).context("parsing the image config")?;
    let diff_ids = config_diff_ids(&json, manifest.layers().len())?;
    Ok(Config {
        chains: chain_ids(&diff_ids),
        bytes,
    })
}

/// Fails unless the config's chain IDs are those the layers' descriptors
/// give: else the config would name a layer's snapshot after other content
/// (the snapshotter refuses such a Prepare too, docs/security.md).
fn same_chains(config: &[String], descriptors: &[String]) -> Result<()> {
    match config.iter().zip(descriptors).position(|(c, d)| c != d) {
        None => Ok(()),
        Some(i) => bail!(
            "layer {i}: the image config's diff_ids name its snapshot {} (chain ID), but \
             the anchors on the layer descriptors name it {}; refusing the image, whose \
             config does not name the anchors on its descriptors (docs/security.md)",
            config[i],
            descriptors[i]
        ),
    }
}

/// The chain IDs of an image whose layers are all lazybd layers, from the
/// manifest alone: a lazybd layer's diff_id is its anchor (its blob digest
/// in version 1), which its descriptor carries. `None` when a layer is of
/// another kind (its diff_id is only in the config) or its annotations do
/// not parse (the snapshotter says why at its Prepare).
fn lazy_chain_ids(manifest: &ImageManifest) -> Option<Vec<String>> {
    let diff_ids = manifest
        .layers()
        .iter()
        .map(|layer| {
            if layer.media_type().to_string() != MEDIA_LAZYBD_LAYER {
                return None;
            }
            let annotations = LazyLayerAnnotations::from_map(layer.annotations().as_ref()?).ok()?;
            Some(annotations.diff_id(layer.digest().as_ref()).to_owned())
        })
        .collect::<Option<Vec<_>>>()?;
    Some(chain_ids(&diff_ids))
}

async fn fetch_manifest(registry: &RegistryClient, platform: &str) -> Result<Documents> {
    let (os, arch) = platform
        .split_once('/')
        .context("--platform must be OS/ARCH, e.g. linux/amd64")?;
    let top = registry.manifest().await?;
    let top_doc = (
        top.bytes.to_vec(),
        top.media_type.clone(),
        top.digest.clone(),
    );
    let (bytes, digest) = if is_manifest_list(&top.media_type) {
        let index = ImageIndex::from_reader(&top.bytes[..]).context("parsing the image index")?;
        let entry = pick_platform(index.manifests(), os, arch)
            .with_context(|| format!("the image has no {os}/{arch} manifest"))?;
        let m = registry.manifest_by_digest(entry.digest().as_ref()).await?;
        (m.bytes.to_vec(), m.digest)
    } else {
        (top.bytes.to_vec(), top.digest)
    };
    Ok(Documents {
        top: top_doc,
        manifest: ImageManifest::from_reader(&bytes[..]).context("parsing the manifest")?,
        manifest_bytes: bytes,
        manifest_digest: digest,
    })
}

/// OCI chain IDs: the snapshot names containerd gives unpacked layers.
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        out.push(oci::chain_id(out.last().map(String::as_str), d));
    }
    out
}

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// What happened to a layer; the order indexes the summary counts.
#[derive(Clone, Copy)]
enum Prepared {
    Already = 0,
    Lazily = 1,
    Unpacked = 2,
}

/// containerd's services, in one namespace, under one lease (so nothing
/// written is collected before the image refers to it).
struct Containerd {
    channel: Channel,
    namespace: String,
    lease: String,
}

impl Containerd {
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        let md = req.metadata_mut();
        md.insert(
            "containerd-namespace",
            self.namespace.parse().expect("ascii namespace"),
        );
        md.insert(
            "containerd-lease",
            self.lease.parse().expect("ascii lease id"),
        );
        req
    }

    async fn create_lease(&self) -> Result<()> {
        // containerd's `gc.expire` label: RFC 3339.
        let expire =
            humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600))
                .to_string();
        LeasesClient::new(self.channel.clone())
            .create(self.req(containerd_client::services::v1::CreateRequest {
                id: self.lease.clone(),
                labels: HashMap::from([("containerd.io/gc.expire".to_string(), expire)]),
            }))
            .await
            .context("creating a lease")?;
        Ok(())
    }

    async fn delete_lease(&self) -> Result<()> {
        LeasesClient::new(self.channel.clone())
            .delete(self.req(DeleteRequest {
                id: self.lease.clone(),
                sync: false,
            }))
            .await?;
        Ok(())
    }

    /// Writes the image's documents into the content store, each with the
    /// labels that keep what it refers to. The lease holds each until the
    /// image does: no order among them, nor between them and the layers (a
    /// cold start waits for this).
    async fn write_documents(
        &self,
        docs: &Documents,
        config: &Config,
        snapshotter: &str,
    ) -> Result<()> {
        let config_digest = docs.manifest.config().digest().to_string();
        let top_chain = config.chains.last().context("the image has no layers")?;
        let snapshot_gc = format!("containerd.io/gc.ref.snapshot.{snapshotter}");
        let mut refs = HashMap::from([(
            "containerd.io/gc.ref.content.config".to_string(),
            config_digest.clone(),
        )]);
        for (i, l) in docs.manifest.layers().iter().enumerate() {
            refs.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest().to_string(),
            );
        }
        let index = async {
            if docs.top.2 == docs.manifest_digest {
                return Ok(());
            }
            let refs = HashMap::from([(
                "containerd.io/gc.ref.content.m.0".to_string(),
                docs.manifest_digest.clone(),
            )]);
            self.write(&docs.top.0, &docs.top.2, refs).await
        };
        tokio::try_join!(
            self.write(
                &config.bytes,
                &config_digest,
                HashMap::from([(snapshot_gc, top_chain.clone())]),
            ),
            self.write(&docs.manifest_bytes, &docs.manifest_digest, refs),
            index,
        )?;
        Ok(())
    }

    /// Prepares the image's layers as the snapshots `chains` names, and
    /// counts what happened to them.
    async fn prepare_layers(
        &self,
        args: &Args,
        docs: &Documents,
        registry: &RegistryClient,
        chains: &[String],
    ) -> Result<[usize; 3]> {
        // Asked several at once (a manifest may list any number of layers);
        // each Prepare needs its parent, so those go one after another.
        let present: Vec<bool> = futures_util::stream::iter(chains)
            .map(|c| self.has_snapshot(&args.snapshotter, c))
            .buffered(STATS_AT_ONCE)
            .collect()
            .await;
        let mut counts = [0usize; 3];
        for (i, layer) in docs.manifest.layers().iter().enumerate() {
            if present[i] {
                counts[Prepared::Already as usize] += 1;
                continue;
            }
            let parent = if i == 0 { "" } else { chains[i - 1].as_str() };
            let prepared = self
                .prepare_layer(
                    args,
                    &docs.manifest_digest,
                    layer,
                    &chains[i],
                    parent,
                    registry,
                )
                .await
                .with_context(|| format!("layer {i} ({})", layer.digest()))?;
            counts[prepared as usize] += 1;
        }
        Ok(counts)
    }

    /// Writes a small blob into the content store in one request.
    async fn write(
        &self,
        data: &[u8],
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let req = WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: format!("lazybd-pull-{digest}"),
            total: data.len() as i64,
            expected: digest.to_owned(),
            offset: 0,
            data: data.to_vec(),
            labels,
        };
        self.write_stream(futures_util::stream::iter([req]), digest)
            .await
    }

    /// Streams a file into the content store, 1 MiB per message.
    async fn write_file(&self, path: &std::path::Path, digest: &str, size: u64) -> Result<()> {
        let file = tokio::fs::File::open(path).await?;
        let reference = format!("lazybd-pull-{digest}");
        let expected = digest.to_owned();
        let requests =
            futures_util::stream::unfold((file, 0u64, false), move |(mut file, offset, done)| {
                let (reference, expected) = (reference.clone(), expected.clone());
                async move {
                    if done {
                        return None;
                    }
                    let mut buf = vec![0u8; 1 << 20];
                    let n = file.read(&mut buf).await.unwrap_or(0);
                    buf.truncate(n);
                    let last = offset + n as u64 >= size || n == 0;
                    let req = WriteContentRequest {
                        action: if last {
                            WriteAction::Commit
                        } else {
                            WriteAction::Write
                        } as i32,
                        r#ref: reference,
                        total: size as i64,
                        expected,
                        offset: offset as i64,
                        data: buf,
                        labels: HashMap::new(),
                    };
                    Some((req, (file, offset + n as u64, last)))
                }
            });
        self.write_stream(requests, digest).await
    }

    async fn write_stream(
        &self,
        requests: impl futures_util::Stream<Item = WriteContentRequest> + Send + 'static,
        digest: &str,
    ) -> Result<()> {
        let mut responses = match ContentClient::new(self.channel.clone())
            .write(self.req(requests))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::AlreadyExists => return Ok(()),
            Err(s) => {
                return Err(s).with_context(|| format!("writing {digest} to the content store"))
            }
        };
        while let Some(r) = responses.next().await {
            match r {
                Ok(_) => {}
                Err(s) if s.code() == Code::AlreadyExists => return Ok(()),
                Err(s) => {
                    return Err(s).with_context(|| format!("writing {digest} to the content store"))
                }
            }
        }
        Ok(())
    }

    /// Whether the snapshotter has committed snapshot `chain` (a layer
    /// unpacked before).
    async fn has_snapshot(&self, snapshotter: &str, chain: &str) -> bool {
        SnapshotsClient::new(self.channel.clone())
            .stat(self.req(StatSnapshotRequest {
                snapshotter: snapshotter.to_owned(),
                key: chain.to_owned(),
            }))
            .await
            .is_ok()
    }

    async fn prepare_layer(
        &self,
        args: &Args,
        manifest_digest: &str,
        layer: &oci_spec::image::Descriptor,
        chain: &str,
        parent: &str,
        registry: &RegistryClient,
    ) -> Result<Prepared> {
        let mut snapshots = SnapshotsClient::new(self.channel.clone());
        let key = format!("extract-{} {chain}", nanos());
        let mut labels = layer
            .annotations()
            .as_ref()
            .map(oci::labels::inherited)
            .unwrap_or_default();
        labels.extend([
            (oci::labels::TARGET.to_string(), chain.to_owned()),
            (oci::labels::IMAGE_REF.into(), args.reference.clone()),
            (
                oci::labels::MANIFEST_DIGEST.into(),
                manifest_digest.to_owned(),
            ),
            (oci::labels::LAYER_DIGEST.into(), layer.digest().to_string()),
        ]);
        let prepared = snapshots
            .prepare(self.req(PrepareSnapshotRequest {
                snapshotter: args.snapshotter.clone(),
                key: key.clone(),
                parent: parent.to_owned(),
                labels,
            }))
            .await;
        let mounts = match prepared {
            Err(s) if s.code() == Code::AlreadyExists => return Ok(Prepared::Lazily),
            Err(s) => return Err(s).context("preparing the snapshot"),
            Ok(r) => r.into_inner().mounts,
        };
        let unpacked = self.unpack(args, layer, &mounts, registry).await;
        let done = match unpacked {
            Ok(()) => snapshots
                .commit(self.req(CommitSnapshotRequest {
                    snapshotter: args.snapshotter.clone(),
                    name: chain.to_owned(),
                    key: key.clone(),
                    labels: HashMap::new(),
                }))
                .await
                .map(|_| ())
                .context("committing the snapshot"),
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            let _ = snapshots
                .remove(self.req(RemoveSnapshotRequest {
                    snapshotter: args.snapshotter.clone(),
                    key,
                }))
                .await;
            return Err(e);
        }
        Ok(Prepared::Unpacked)
    }

    /// The ordinary path: download the layer, let containerd apply it.
    async fn unpack(
        &self,
        args: &Args,
        layer: &oci_spec::image::Descriptor,
        mounts: &[Mount],
        registry: &RegistryClient,
    ) -> Result<()> {
        let media_type = layer.media_type().to_string();
        if media_type == MEDIA_LAZYBD_LAYER {
            bail!(
                "snapshotter {:?} did not attach this lazybd layer lazily (is it \
                 lazybd-snapshotter, and can it reach the registry? see its log)",
                args.snapshotter
            );
        }
        let digest = layer.digest().to_string();
        let tmp = tempfile::NamedTempFile::new()?;
        registry
            .blob_to_file(&digest, layer.size(), tmp.path())
            .await?;
        self.write_file(tmp.path(), &digest, layer.size()).await?;
        DiffClient::new(self.channel.clone())
            .apply(self.req(ApplyRequest {
                diff: Some(Descriptor {
                    media_type,
                    digest,
                    size: layer.size() as i64,
                    annotations: HashMap::new(),
                }),
                mounts: mounts.to_vec(),
                payloads: HashMap::new(),
            }))
            .await
            .context("applying the layer")?;
        Ok(())
    }

    async fn put_image(&self, name: &str, top: &(Vec<u8>, String, String)) -> Result<()> {
        let image = Image {
            name: name.to_owned(),
            labels: HashMap::new(),
            target: Some(Descriptor {
                media_type: top.1.clone(),
                digest: top.2.clone(),
                size: top.0.len() as i64,
                annotations: HashMap::new(),
            }),
            created_at: None,
            updated_at: None,
        };
        let mut images = ImagesClient::new(self.channel.clone());
        match images
            .create(self.req(CreateImageRequest {
                image: Some(image.clone()),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                images
                    .update(self.req(UpdateImageRequest {
                        image: Some(image),
                        update_mask: None,
                    }))
                    .await
                    .context("updating the image record")?;
                Ok(())
            }
            Err(s) => Err(s).context("creating the image record"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        use sha2::{Digest as _, Sha256};
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let chains = chain_ids(&[d('a'), d('b')]);
        assert_eq!(chains[0], d('a'));
        let want = Sha256::digest(format!("{} {}", d('a'), d('b')));
        assert_eq!(chains[1], format!("sha256:{}", hex::encode(want)));
    }

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    /// A manifest with `layers` as (media type, digest, annotations).
    fn manifest(layers: &[(&str, String, serde_json::Value)]) -> ImageManifest {
        let layers: Vec<_> = layers
            .iter()
            .map(|(media_type, digest, annotations)| {
                serde_json::json!({"mediaType": media_type, "digest": digest, "size": 1,
                    "annotations": annotations})
            })
            .collect();
        let json = serde_json::json!({"schemaVersion": 2,
            "mediaType": oci::MEDIA_OCI_MANIFEST,
            "config": {"mediaType": oci::MEDIA_OCI_CONFIG, "digest": digest('c'), "size": 1},
            "layers": layers});
        ImageManifest::from_reader(json.to_string().as_bytes()).unwrap()
    }

    /// A lazybd layer's annotations: version 3 with `anchor`, else version 1.
    fn lazy_annotations(anchor: Option<String>) -> serde_json::Value {
        let Some(anchor) = anchor else {
            return serde_json::json!({
                oci::v1::ANN_VERSION: "1", oci::v1::ANN_SOURCE_DIFF_ID: digest('s'),
                oci::v1::ANN_INDEX_OFFSET: "10", oci::v1::ANN_INDEX_LENGTH: "20",
                oci::v1::ANN_IMAGE_SIZE: "4096", oci::v1::ANN_CHUNK_SIZE: "4096",
            });
        };
        let v3 = LazyLayerAnnotations {
            version: 3,
            index_digest: Some(anchor),
            source_diff_id: digest('s'),
            index_offset: 10,
            index_length: 20,
            image_size: 4096,
            chunk_size: 4096,
        };
        serde_json::json!(v3.to_map())
    }

    #[test]
    fn lazybd_layers_name_their_snapshots_without_the_config() {
        let m = manifest(&[
            (
                MEDIA_LAZYBD_LAYER,
                digest('1'),
                lazy_annotations(Some(digest('a'))),
            ),
            (MEDIA_LAZYBD_LAYER, digest('2'), lazy_annotations(None)),
        ]);
        // The anchor, or a version 1 layer's blob digest.
        assert_eq!(
            lazy_chain_ids(&m),
            Some(chain_ids(&[digest('a'), digest('2')]))
        );
    }

    #[test]
    fn other_layers_wait_for_the_config() {
        let gzip = "application/vnd.oci.image.layer.v1.tar+gzip";
        let anchored = lazy_annotations(Some(digest('a')));
        for m in [
            manifest(&[(gzip, digest('1'), serde_json::json!({}))]),
            manifest(&[
                (MEDIA_LAZYBD_LAYER, digest('1'), anchored.clone()),
                (gzip, digest('2'), serde_json::json!({})),
            ]),
            // Annotations that do not parse: the snapshotter says why.
            manifest(&[(MEDIA_LAZYBD_LAYER, digest('1'), serde_json::json!({}))]),
            // Lazybd annotations on a layer of another media type.
            manifest(&[(gzip, digest('1'), anchored)]),
        ] {
            assert_eq!(lazy_chain_ids(&m), None);
        }
    }

    #[test]
    fn a_config_that_names_other_snapshots_is_refused() {
        let descriptors = chain_ids(&[digest('a'), digest('b')]);
        assert!(same_chains(&descriptors, &descriptors).is_ok());
        let config = chain_ids(&[digest('a'), digest('v')]);
        let e = same_chains(&config, &descriptors).unwrap_err().to_string();
        assert!(e.starts_with("layer 1:") && e.contains(&config[1]), "{e}");
        assert!(
            e.contains(&descriptors[1]) && e.contains("docs/security.md"),
            "{e}"
        );
    }
}
