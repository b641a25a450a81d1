//! Resolve-or-pull: where an image a run needs is taken from the store or
//! pulled into it. `ember run` and the node agent both go through
//! [`resolve_or_pull`]; they differ only in how they find the local
//! candidate (`ember run` by name in the store's index, the node by the
//! digest the control plane pinned, from what it pulled before).

use std::sync::Arc;

use ember_control::model::PinnedImage;
use ember_oci::{Digest, Reference};
use ember_registry::RegistryClient;
use ember_store::{
    ImageRecord, PullOptions, PullProgress, PullReport, SilentProgress, Store, StoreError,
};

/// An image ready to run, and how it got into the store.
#[derive(Debug)]
pub enum ReadyImage {
    /// It was in the store already, every layer unpacked.
    Local(ImageRecord),
    /// It was pulled just now.
    Pulled(PullReport),
}

impl ReadyImage {
    /// The image as recorded in the store.
    pub fn record(&self) -> &ImageRecord {
        match self {
            ReadyImage::Local(r) => r,
            ReadyImage::Pulled(p) => &p.image,
        }
    }

    /// The image as recorded in the store, by value.
    pub fn into_record(self) -> ImageRecord {
        match self {
            ReadyImage::Local(r) => r,
            ReadyImage::Pulled(p) => p.image,
        }
    }
}

/// What a pull needs. Built only when the image is not here, so a warm
/// start neither parses the reference nor sets up a registry client.
pub struct Pull {
    /// The image to pull.
    pub reference: Reference,
    /// The registry (and its mirrors) to pull from.
    pub registry: Arc<RegistryClient>,
    /// Platform, durability, retries.
    pub options: PullOptions,
    /// Told how the pull goes.
    pub progress: Arc<dyn PullProgress>,
}

/// Why an image could not be made ready; `E` is the caller's error in
/// setting up the [`Pull`].
#[derive(Debug, thiserror::Error)]
pub enum ImageError<E> {
    /// The pull could not be set up (a bad reference, registry flags).
    #[error("{0}")]
    Setup(E),
    /// The pull failed.
    #[error("pulling {reference}")]
    Pull {
        /// What was being pulled.
        reference: Reference,
        /// Why it failed (boxed: a store error is large, and the
        /// successful result should not pay for it).
        #[source]
        source: Box<StoreError>,
    },
}

/// `true` when every layer of `image` is unpacked in `store`: an image
/// whose index entry survived but whose layers were removed (by `ember
/// gc`, or a reboot that discarded unsynced ones) must be pulled again.
pub fn is_complete(store: &Store, image: &ImageRecord) -> bool {
    store.missing_layers(image).is_empty()
}

/// The image `name` (a reference or a digest prefix) names in `store`, if
/// it is there complete.
pub fn find_local(store: &Store, name: &str) -> Result<Option<ImageRecord>, StoreError> {
    let index = store.read_index()?;
    Ok(store
        .resolve(&index, name)
        .ok()
        .filter(|i| is_complete(store, i)))
}

/// `local` if it is complete in `store`; otherwise the image `pull`
/// describes, pulled into `store`.
pub async fn resolve_or_pull<E>(
    store: &Store,
    local: Option<ImageRecord>,
    pull: impl FnOnce() -> Result<Pull, E>,
) -> Result<ReadyImage, ImageError<E>> {
    if let Some(image) = local
        && is_complete(store, &image)
    {
        return Ok(ReadyImage::Local(image));
    }
    let pull = pull().map_err(ImageError::Setup)?;
    ember_store::pull(
        store,
        &pull.registry,
        &pull.reference,
        &pull.options,
        pull.progress,
    )
    .await
    .map(ReadyImage::Pulled)
    .map_err(|source| ImageError::Pull {
        reference: pull.reference,
        source: Box::new(source),
    })
}

/// The image the store holds under manifest (or index) digest `digest`:
/// one `ember image import` or an earlier agent put there. Read only when
/// this agent has not seen the digest yet, a path that would otherwise
/// pull (and an imported image may be in no registry at all).
fn stored(store: &Store, digest: &str) -> Option<ImageRecord> {
    let ix = store.read_index().ok()?;
    ix.images
        .values()
        .find(|i| {
            i.manifest.to_string() == digest
                || i.index.as_ref().is_some_and(|d| d.to_string() == digest)
        })
        .cloned()
}

/// The reference a pinned image is pulled by: its name with the pinned
/// digest, so the pull gets exactly what the control plane pinned.
pub(crate) fn pinned_reference(image: &PinnedImage) -> Result<Reference, String> {
    let reference: Reference = image.reference.parse().map_err(|e| {
        format!(
            "image reference {:?}: {}",
            image.reference,
            ember_error::chain(&e)
        )
    })?;
    let digest: Digest = image.digest.parse().map_err(|e| {
        format!(
            "image digest {:?}: {}",
            image.digest,
            ember_error::chain(&e)
        )
    })?;
    Ok(reference.with_digest(digest))
}

impl crate::agent::NodeAgent {
    /// Whether the image pinned as `digest` is here without a pull: one
    /// this agent ran or pulled before, or one it finds complete in the
    /// store's index (an `ember image import`), then remembered, so the
    /// first run of an imported image reports `ImageReady` at once.
    pub(crate) fn image_at_hand(&self, digest: &str) -> bool {
        let images = || self.images.lock().unwrap_or_else(|e| e.into_inner());
        if images().contains_key(digest) {
            return true;
        }
        match stored(&self.store, digest).filter(|r| is_complete(&self.store, r)) {
            Some(r) => {
                images().insert(digest.to_string(), r);
                true
            }
            None => false,
        }
    }

    /// `image` in the store, pulled (through the cache if any) when this
    /// process has not pulled it before or its layers have gone since.
    pub(crate) async fn ensure_image(&self, image: &PinnedImage) -> Result<ImageRecord, String> {
        let known = self
            .images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&image.digest)
            .cloned()
            .or_else(|| stored(&self.store, &image.digest));
        // Set only if a pull is needed: counted until this returns, and
        // pre-pulls hold still until it ends.
        let mut _pulling = None;
        let mut pulling = None;
        let ready = resolve_or_pull(&self.store, known, || {
            _pulling = Some(self.metrics.pull());
            pulling = Some(self.prepull.run_pull(&image.digest));
            Ok::<_, String>(Pull {
                reference: pinned_reference(image)?,
                registry: self.registry.clone(),
                options: PullOptions::default(),
                progress: Arc::new(SilentProgress),
            })
        })
        .await
        .map_err(|e| match e {
            ImageError::Setup(e) => e,
            e @ ImageError::Pull { .. } => ember_error::chain(&e).to_string(),
        });
        drop(pulling);
        let ready = ready?;
        match ready {
            ReadyImage::Local(record) => {
                self.images
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(image.digest.clone())
                    .or_insert_with(|| record.clone());
                Ok(record)
            }
            ReadyImage::Pulled(report) => {
                self.images
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(image.digest.clone(), report.image.clone());
                Ok(report.image)
            }
        }
    }
}
